"""The mask terms model code puts on attention scores, folded into the op's one ``attn_mask``.

Between the score product and the softmax, a term is one of:

- ``"add"``: a float tensor added (an additive padding or causal mask, T5's relative position bias,
  BLOOM's ALiBi through ``baddbmm``, times its beta); several add up;
- ``"masked"``: ``scores.masked_fill(m, low)``, masked where ``m`` is True (DistilBERT, DeBERTa);
- ``"kept"``: ``torch.where(c, scores, low)``, kept where ``c`` is True (GPT-2's causal buffer);

``low`` being -inf or at most ``finfo.min / 2`` (`mask_values.negligible`), so that a masked entry's
softmax weight is exactly 0 in eager mode too, whatever else is added. (A row masked entirely is
the one difference, as for additive ``finfo.min`` masks: eager gives it uniform weights, the op zeros.)

`fold_terms` makes the op's mask of them: the sum of the additive terms; a bool keep mask (True =
keep: the kept conditions and the negated masked ones, and-ed); or ``where(keep, sum, -inf)`` when
there are both. A single term is the graph's own node, so `mask_from_positions` sees the model's mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.fx import GraphModule, Node

from .attention_site import insert_call
from .head_views import to_heads
from .mask_interpreter import NOT
from .node_patterns import example_value, is_number

TermKind = Literal["add", "masked", "kept"]


@dataclass(frozen=True)
class ScoreTerm:
    """One term on the scores; ``batch_heads``: B*H when the scores it applies to are 3-D
    ``[B*H, Sq, Skv]``, None when they are 4-D; ``factor`` multiplies an added term (``baddbmm``'s
    beta: a number or a symbolic float's node)."""

    node: Node
    kind: TermKind
    batch_heads: object = None
    factor: Any = 1.0


def fold_terms(gm: GraphModule, before: Node, terms: Sequence[ScoreTerm], heads: int) -> Node | None:
    """One mask broadcastable to ``[B, H, Sq, Skv]`` equal in effect to ``terms`` (None for no terms),
    its nodes inserted before ``before``; H is ``heads``."""

    def four_d(term: ScoreTerm) -> Node:
        node = term.node
        if term.batch_heads is not None:
            node = to_heads(gm, before, node, heads, term.batch_heads)
        if is_number(term.factor) and term.factor == 1:
            return node
        return insert_call(gm, before, torch.mul, (node, term.factor))

    additive = None
    for term in terms:
        if term.kind == "add":
            node = four_d(term)
            additive = node if additive is None else insert_call(gm, before, torch.add, (additive, node))
    keep = None
    for term in terms:
        if term.kind != "add":
            node = four_d(term)
            node = node if term.kind == "kept" else _negated(gm, before, node)
            keep = node if keep is None else insert_call(gm, before, torch.logical_and, (keep, node))
    if keep is None or additive is None:
        return keep if additive is None else additive
    return insert_call(gm, before, torch.where, (keep, additive, float("-inf")))


def _negated(gm: GraphModule, before: Node, mask: Node) -> Node:
    """``~mask`` for a bool mask: the operand of a negation already in the graph, else a new one."""
    if NOT.matches(mask) and mask.args:
        operand = example_value(mask.args[0])
        if operand is not None and operand.dtype == torch.bool:
            return mask.args[0]
    return insert_call(gm, before, torch.logical_not, (mask,))
