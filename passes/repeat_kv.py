"""Recognise transformers' ``repeat_kv`` in a Dynamo graph, so GQA can run without the copy.

``repeat_kv(x, n)`` turns ``x`` [B, Hkv, S, D] into [B, Hkv * n, S, D] where head ``h`` is a copy of
KV head ``h // n``::

    x[:, :, None, :, :].expand(B, Hkv, n, S, D).reshape(B, Hkv * n, S, D)

which is what SDPA's ``enable_gqa=True`` does inside the kernel. The unsqueeze may also be spelled
``x.unsqueeze(2)`` and the reshape ``view``; sizes are checked on the recorded example values.
"""

from __future__ import annotations

from typing import Any

from torch.fx import Node

from .node_patterns import EXPAND, INDEX, RESHAPE, UNSQUEEZE, example_value, known_equal, normalized_dim

_ALL = slice(None)


def _is_head_unsqueeze_index(index: Any) -> bool:
    """``[:, :, None]``, ``[:, :, None, :, :]`` or ``[:, :, None, ...]``."""
    return (
        isinstance(index, tuple)
        and index[:3] == (_ALL, _ALL, None)
        and all(i == _ALL or i is Ellipsis for i in index[3:])
    )


def _unsqueezed_source(node: Node) -> Node | None:
    """``x`` when ``node`` inserts a unit dim at position 2 of a 4-D ``x``, else None."""
    bound = UNSQUEEZE.bind(node)
    if bound is not None:
        return bound["input"] if normalized_dim(bound["dim"], 5) == 2 else None
    bound = INDEX.bind(node)
    if bound is not None and _is_head_unsqueeze_index(bound["index"]):
        return bound["input"]
    return None


def repeat_kv_source(node: Any) -> tuple[Node, int] | None:
    """``(x, n)`` when ``node`` is ``repeat_kv(x, n)``, else None."""
    if not isinstance(node, Node) or not RESHAPE.matches(node):
        return None
    expand = node.args[0]
    if not isinstance(expand, Node) or not EXPAND.matches(expand):
        return None
    unsqueezed = expand.args[0]
    source = _unsqueezed_source(unsqueezed) if isinstance(unsqueezed, Node) else None
    x, expanded, out = example_value(source), example_value(expand), example_value(node)
    if x is None or expanded is None or out is None or x.dim() != 4 or expanded.dim() != 5 or out.dim() != 4:
        return None
    batch, kv_heads, seq, dim = x.shape
    n_rep = expanded.shape[2]
    if not isinstance(n_rep, int):
        return None
    sizes_ok = all(
        known_equal(a, b)
        for a, b in zip(
            (*expanded.shape, *out.shape),
            (batch, kv_heads, n_rep, seq, dim, batch, kv_heads * n_rep, seq, dim),
        )
    )
    return (source, n_rep) if sizes_ok else None
