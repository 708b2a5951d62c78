"""Heads folded into the batch: views between ``[B*H, S, T]`` and ``[B, H, S, T]``.

BART, BLOOM and DeBERTa compute attention on 3-D ``[B*H, S, D]`` tensors with ``bmm`` and view the
scores as ``[B, H, Sq, Skv]`` around the mask; the op takes 4-D tensors. `head_view` recognises such
a view (either way; the last two dims kept, the leading dim split as ``b * H + h``), and `to_heads`
inserts ``x.unflatten(0, (-1, H))`` for a 3-D operand: the same split, so a 4-D mask term added
between the views means what it meant. Without any view, ``H = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from .attention_site import insert_call
from .node_patterns import RESHAPE, example_value, known_equal


@dataclass(frozen=True)
class HeadView:
    """A view between 3-D and 4-D scores: its input and H (None when H is symbolic)."""

    source: Node
    heads: int | None


def head_view(node: Node) -> HeadView | None:
    """``node`` as a view ``[B*H, S, T] <-> [B, H, S, T]`` keeping the last two dims, or None."""
    source = node.args[0] if RESHAPE.matches(node) and node.args else None
    before, after = example_value(source), example_value(node)
    if before is None or after is None or {before.dim(), after.dim()} != {3, 4}:
        return None
    merged, split = (before, after) if before.dim() == 3 else (after, before)
    expected = (split.shape[0] * split.shape[1], *split.shape[2:])
    if not all(known_equal(a, b) for a, b in zip(merged.shape, expected)):
        return None
    heads = split.shape[1]
    return HeadView(source, heads if isinstance(heads, int) else None)


def to_heads(gm: GraphModule, before: Node, node: Node, heads: int, batch_heads: object) -> Node:
    """``node`` ``[B*H, S, T]`` as ``[B, H, S, T]`` when it is 3-D with leading dim ``batch_heads``;
    ``node`` itself otherwise (a 4-D node, or one that broadcasts over the leading dim)."""
    value = example_value(node)
    if value is None or value.dim() != 3 or not known_equal(value.shape[0], batch_heads):
        return node
    return insert_call(gm, before, torch.unflatten, (node, 0, (-1, heads)))
