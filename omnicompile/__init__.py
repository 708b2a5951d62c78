"""omnicompile: a torch.compile backend that rewrites attention into OmniSparse sparse attention."""

from .config import OmniSparseConfig

__all__ = ["OmniSparseConfig"]
