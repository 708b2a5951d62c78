"""Block-sparse attention over a `BlockSelection`: the reference `sparse_attention` (its backward is
autograd's); the Triton kernels `triton_fwd.sparse_attention` and `triton_bwd.sparse_attention_backward`."""

from .reference import sparse_attention

__all__ = ["sparse_attention"]
