"""Cleanup after a pass changed a graph: remove what the rewrite left dead, lint, recompile.

Dead-code elimination cannot use FX's default purity on a torch-level graph: ``Node.is_impure``
deems every ``call_method`` pure, so an in-place ``cache.index_copy_(...)`` whose result is unused
would be deleted. Only unused nodes of the operations the rewrites consume (views, products,
scalings, softmax, float casts, copies, identity dropouts, SDPA without dropout, and the mask
construction that `mask_from_positions` proved: `mask_interpreter.MASK_CALLS`) are removed. An
in-place ``scores += bias`` the eager rewrite consumed is first made out of place by that pass.
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from .mask_interpreter import MASK_CALLS
from .node_patterns import (
    ADD,
    BADDBMM,
    BMM,
    COPY,
    DIV,
    DROPOUT,
    EINSUM,
    EXPAND,
    INDEX,
    MATMUL,
    MUL,
    PERMUTE,
    RESHAPE,
    SDPA,
    SOFTMAX,
    TRANSPOSE,
    UNSQUEEZE,
    dropout_is_identity,
    float_cast_source,
)

_PURE_CALLS = (
    *(ADD, BADDBMM, BMM, COPY, DIV, EINSUM, EXPAND, INDEX, MATMUL, MUL, PERMUTE, RESHAPE, SOFTMAX),
    *(TRANSPOSE, UNSQUEEZE, *MASK_CALLS),
)


def is_removable(node: Node) -> bool:
    """Whether ``node`` may be deleted when nothing uses it (no side effect, no random numbers drawn)."""
    dropout, sdpa = DROPOUT.bind(node), SDPA.bind(node)
    if dropout is not None:
        return dropout_is_identity(dropout)
    if sdpa is not None:
        return sdpa["dropout_p"] == 0
    return float_cast_source(node) is not None or any(call.matches(node) for call in _PURE_CALLS)


def clean_up_graph(gm: GraphModule) -> None:
    """Remove dead nodes of the rewritten patterns, check the graph, regenerate ``gm``'s code."""
    gm.graph.eliminate_dead_code(is_impure_node=lambda node: not is_removable(node))
    gm.graph.lint()
    gm.recompile()
