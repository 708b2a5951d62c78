"""omnicompile: a torch.compile backend that rewrites attention into OmniSparse sparse attention.

Public API: `OmniSparseConfig`, `backend` (a backend for a config), `explain` (what the backend
did at each attention site), `load_package` (load an exported AOTInductor package, docs/EXPORT.md),
`merge_attention` (merge the op's ``(out, lse)`` over disjoint key sets exactly).
``torch.compile(model, backend="omnisparse")`` needs no import.
Submodules: `omnicompile.export` (``export``: AOTInductor / Torch-TensorRT packages, docs/EXPORT.md),
`omnicompile.hf_cache` (``SlimKVCache`` for decode, docs/DECODE.md), `omnicompile.hf_attention`
(``attn_implementation="omnisparse"``, registered on import), `omnicompile.demos.structured`
(structured attention inputs), `omnicompile.metrics`.
"""

from . import ops  # noqa: F401  (registers torch.ops.omnisparse.*)
from .backend import backend
from .config import OmniSparseConfig
from .explain import ExplainReport, ExplainSite, explain
from .loading import load_package
from .merge import merge_attention

__all__ = [
    "ExplainReport",
    "ExplainSite",
    "OmniSparseConfig",
    "backend",
    "explain",
    "load_package",
    "merge_attention",
]
