"""Pass: replace hand-written ("eager") attention by ``torch.ops.omnisparse.attention``.

The pattern, walked back from each last-dim ``softmax`` to the score product and forward to the
value product::

    scores = q @ kT                      # a score product (`attention_products`): matmul, bmm,
                                         # baddbmm(bias, q, kT, beta, alpha), einsum
    scores = scores * s  |  scores / d   # zero or more scalings: numbers, a symbolic float, or a
                                         # 0-d tensor proven constant (`constant_scalars`)
    scores = tanh(scores / cap) * cap    # at most one logit soft-cap (Gemma 2), after the scalings:
                                         # the same cap both times: a number > 0, a 0-d tensor proven
                                         # constant, or one symbolic float's node (dynamic=True)
    scores = scores + term               # zero or more mask terms (`score_masks`): float tensors
    scores = scores.masked_fill(m, low)  # added, masked_fill / where with -inf or finfo.min;
    scores = torch.where(c, scores, low) # all after the scalings (a scaled mask is not SDPA's)
    weights = softmax(scores, dim=-1)    # float casts (.float(), .to, .type, .type_as) anywhere,
    weights = dropout(weights, p, False) # identity dropouts and clones after the softmax
    out = weights @ v                    # a value product: matmul, bmm, einsum

``kT`` is k with its last two dims swapped (``transpose`` / ``permute``; otherwise the op gets
``kT.transpose(-2, -1)``); ``repeat_kv`` on k and v folds into ``enable_gqa=True``. Products on 3-D
``[B*H, S, D]`` tensors with views to ``[B, H, Sq, Skv]`` around the mask (BART, BLOOM, DeBERTa) get
their operands unflattened to 4-D and the op's output flattened back (`head_views`).

The site is ``out``. A site is recorded but left untouched, with the reason, when an intermediate
(scores, weights) is used elsewhere (the op does not produce them), for a dropout in training, a bool
tensor added as a mask, a masked_fill / where value that does not mask, a scaling by a tensor not
proven constant or a division by a symbolic value, views whose head count is symbolic or differs,
a scaling after the soft-cap, and a tanh on the scores that is not a soft-cap (another factor after
it, none, or a cap not proven constant). Shapes the op cannot take are left with
`attention_site.unsupported_reason`. Anything else (a softmax over another
dim, products that are not q·kᵀ then ·v, a mask after the softmax) is not a site.

Why an explicit matcher and not Inductor's pattern matcher: ``register_replacement`` traces its
search functions to ATen graphs, while this pass runs on the torch-level Dynamo graph, where one
operation has several spellings (``operator.matmul``, ``torch.matmul``, ``Tensor.matmul``; positional
or keyword arguments) and the optional steps multiply the patterns; its one-user rule also drops a
reused intermediate silently, where this pass must record why.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from .attention_products import ScoreProduct, score_product, untransposed, value_operand
from .attention_site import AttentionCall, insert_call, rewrite_site
from .constant_scalars import constant_scalar
from .head_views import head_view, to_heads
from .mask_interpreter import MASKED_FILL, WHERE
from .mask_values import negligible
from .node_patterns import (
    ADD,
    COPY,
    DIV,
    DROPOUT,
    IADD,
    MUL,
    SOFTMAX,
    TANH,
    dropout_is_identity,
    example_value,
    float_cast_source,
    is_number,
    is_scalar_value,
    normalized_dim,
    reads_only_metadata,
)
from .score_masks import ScoreTerm, TermKind, fold_terms
from .site_record import PassContext

NOT_SOFT_CAP_REASON = "a tanh on the scores that is not a logit soft-cap tanh(scores / cap) * cap"


@dataclass(frozen=True)
class _Scores:
    """The score half of a site: the product, its scale, the mask terms, the nodes up to the softmax.

    ``scale`` is a number, a symbolic float's node, or None for scalings the op cannot express;
    ``softcap`` the logit soft-cap on the scaled scores (None: none); ``heads`` holds H of every view
    between 3-D and 4-D scores (None for a symbolic H); ``blocker`` says why a recognised step keeps
    the site from becoming the op.
    """

    product: ScoreProduct
    node: Node  # the product's
    scale: float | Node | None = 1.0
    softcap: float | Node | None = None
    terms: tuple[ScoreTerm, ...] = ()
    heads: frozenset[int | None] = frozenset()
    nodes: tuple[Node, ...] = ()
    blocker: str | None = None


@dataclass(frozen=True)
class _Weights:
    """The weights half: the nodes from the softmax to the value product's weights operand, the
    product, its v, and H of the views between."""

    nodes: tuple[Node, ...]
    product: Node
    value: Node
    heads: frozenset[int | None] = frozenset()


def replace_eager_attention(gm: GraphModule, ctx: PassContext) -> bool:
    """Rewrite the hand-written attention of ``gm`` in place; returns whether the graph changed."""
    changed = False
    for softmax in [node for node in gm.graph.nodes if _is_last_dim_softmax(node)]:
        scores = _scores(SOFTMAX.bind(softmax)["input"], mask_allowed=True)
        weights = _weights(softmax)
        if scores is None or weights is None:
            continue
        changed |= _rewrite(gm, ctx, scores, weights)
    return changed


def _rewrite(gm: GraphModule, ctx: PassContext, scores: _Scores, weights: _Weights) -> bool:
    """Build the op's operands (4-D views, the folded mask), rewrite the site, or undo the operands.

    A blocked site is recorded with its operands as the graph holds them (and no mask).
    """
    site, before = weights.product, weights.product
    query, key, value = scores.product.query, scores.product.key, weights.value
    all_heads = scores.heads | weights.heads
    needed = (site, query, key, value, *(term.node for term in scores.terms))
    missing = [node.name for node in needed if example_value(node) is None]
    blocker = f"no example value recorded for {', '.join(missing)}" if missing else None
    blocker = blocker or _blocker(scores, weights, all_heads)
    if blocker:
        call = AttentionCall(query, key, value, None, 0.0, False, 1.0, False)
        return rewrite_site(gm, ctx, site, "eager", call, blocker)
    existing, heads = set(gm.graph.nodes), next(iter(all_heads), 1)
    if scores.product.key_transposed:
        key = untransposed(key) or insert_call(gm, before, torch.transpose, (key, -2, -1))
    score_shape, site_shape = example_value(scores.node).shape, example_value(site).shape
    if len(score_shape) == 3:  # a product on [B*H, ...]: its operands as [B, H, ...]
        query = to_heads(gm, before, query, heads, score_shape[0])
        key = to_heads(gm, before, key, heads, score_shape[0])
    if len(site_shape) == 3:
        value = to_heads(gm, before, value, heads, site_shape[0])
    mask = fold_terms(gm, before, scores.terms, heads)
    call = AttentionCall(query, key, value, mask, 0.0, False, scores.scale, False, scores.softcap)
    if rewrite_site(gm, ctx, site, "eager", call, flatten_heads=len(site_shape) == 3):
        for node in scores.nodes:
            if IADD.matches(node):
                node.target = operator.add  # its input is used by nothing else: in place is not needed
        return True
    for node in reversed([node for node in gm.graph.nodes if node not in existing]):
        gm.graph.erase_node(node)
    return False


def _is_last_dim_softmax(node: Node) -> bool:
    bound, value = SOFTMAX.bind(node), example_value(node)
    return (
        bound is not None
        and value is not None
        and normalized_dim(bound["dim"], value.dim()) == value.dim() - 1
    )


def _scale_source(node: Node) -> tuple[float | Node | None, Node, str | None] | None:
    """``(factor, x, blocker)`` when ``node`` is ``x * factor``, ``factor * x`` or ``x / d``.

    The factor is a number (``1 / d`` for a division; a 0-d tensor proven constant counts as its
    number), or for a multiplication a graph value holding a symbolic float (a module's float
    attribute under ``dynamic=True``); a 0-d tensor not proven constant gives None and a blocker.
    """
    bound = MUL.bind(node)
    if bound is not None:
        for x, factor in ((bound["input"], bound["other"]), (bound["other"], bound["input"])):
            if _is_scores(x) and is_scalar_value(factor):
                return (float(factor) if is_number(factor) else factor), x, None
            if _is_scores(x) and _is_scalar_tensor(factor):
                value, blocker = _constant_factor(factor, invert=False)
                return value, x, blocker
    bound = DIV.bind(node)
    if bound is None or bound["rounding_mode"] is not None or not _is_scores(bound["input"]):
        return None
    divisor, x = bound["other"], bound["input"]
    if is_number(divisor) and divisor != 0:
        return 1.0 / divisor, x, None
    if is_scalar_value(divisor):
        return None, x, f"the scores are divided by a symbolic value ({divisor.name}; the op takes a factor)"
    if not _is_scalar_tensor(divisor):
        return None
    value, blocker = _constant_factor(divisor, invert=True)
    return value, x, blocker


def _soft_cap_source(node: Node) -> tuple[float | Node, Node, tuple[Node, Node]] | None:
    """``(cap, x, (x / cap, tanh))`` when ``node`` is ``tanh(x / cap) * cap`` (either factor order) with
    the same cap at both places: a finite number > 0 or a 0-d tensor proven constant (the cap is that
    number), or one graph value holding a symbolic float (the cap is its node; the op checks it)."""
    bound = MUL.bind(node)
    if bound is None:
        return None
    for capped, factor in ((bound["input"], bound["other"]), (bound["other"], bound["input"])):
        tanh = TANH.bind(capped) if isinstance(capped, Node) else None
        divided = DIV.bind(tanh["input"]) if tanh is not None and isinstance(tanh["input"], Node) else None
        if divided is None or divided["rounding_mode"] is not None or not _is_scores(divided["input"]):
            continue
        steps = (tanh["input"], capped)
        if isinstance(factor, Node) and factor is divided["other"] and is_scalar_value(factor):
            return factor, divided["input"], steps
        cap = constant_scalar(factor)
        if cap is not None and math.isfinite(cap) and cap > 0 and cap == constant_scalar(divided["other"]):
            return cap, divided["input"], steps
    return None


def _constant_factor(tensor: Node, invert: bool) -> tuple[float | None, str | None]:
    """A 0-d tensor scaling as ``(factor, None)``, or ``(None, reason)`` when it is not proven constant."""
    value = constant_scalar(tensor)
    if value is None or (invert and value == 0):
        return None, f"the scores are scaled by {tensor.name}, a tensor not proven constant"
    return (1.0 / value if invert else value), None


def _is_scores(node: object) -> bool:
    value = example_value(node)
    return value is not None and value.dim() >= 2


def _is_scalar_tensor(node: object) -> bool:
    value = example_value(node)
    return value is not None and value.dim() == 0 and value.is_floating_point()


def _scores(node: object, mask_allowed: bool) -> _Scores | None:
    """Walk back from the softmax input to the score product (None if this is not attention).

    ``mask_allowed`` is False once a scaling was passed: mask terms must come after the scalings.
    """
    if not isinstance(node, Node) or example_value(node) is None:
        return None
    product = score_product(node)
    if product is not None:
        return _from_product(node, product, mask_allowed)
    inner: _Scores | None = None
    source = float_cast_source(node) or (node.args[0] if COPY.matches(node) and node.args else None)
    view, capped, scaled = head_view(node), _soft_cap_source(node), _scale_source(node)
    if source is not None:
        inner = _scores(source, mask_allowed)
    elif view is not None:
        inner = _scores(view.source, mask_allowed)
        inner = inner and dataclasses.replace(inner, heads=inner.heads | {view.heads})
    elif capped is not None:
        cap, x, steps = capped
        inner = _scores(x, mask_allowed=False)
        if inner is not None:
            blocker = inner.blocker or (None if inner.softcap is None else "the scores are soft-capped twice")
            inner = dataclasses.replace(inner, softcap=cap, blocker=blocker, nodes=(*inner.nodes, *steps))
    elif scaled is not None:
        factor, x, blocker = scaled
        inner = _scores(x, mask_allowed=False)
        if inner is not None:
            scale = None if factor is None else _combined_scale(inner.scale, factor)
            if inner.softcap is not None:
                blocker = "the scores are scaled after the soft-cap (the op caps the scaled scores)"
            inner = dataclasses.replace(inner, scale=scale, blocker=inner.blocker or blocker)
    elif TANH.matches(node) and node.args:
        inner = _scores(node.args[0], mask_allowed=False)
        inner = inner and dataclasses.replace(inner, blocker=NOT_SOFT_CAP_REASON)
    elif mask_allowed:
        inner = _masked_scores(node)
    if inner is None:
        return None
    return dataclasses.replace(inner, nodes=(*inner.nodes, node))


def _from_product(node: Node, product: ScoreProduct, mask_allowed: bool) -> _Scores | None:
    """The walk's start: the product, with ``baddbmm``'s scale and bias (a bias then scaled: None)."""
    alpha = product.alpha
    if not is_scalar_value(alpha):
        return _Scores(product, node, nodes=(node,), blocker=f"{node.name}: baddbmm alpha={alpha!r}")
    scores = _Scores(product, node, scale=float(alpha) if is_number(alpha) else alpha, nodes=(node,))
    beta = product.beta
    if product.bias is None or (is_number(beta) and beta == 0):  # beta 0: the bias is ignored
        return scores
    if not mask_allowed:
        return None
    if not is_scalar_value(beta):
        return dataclasses.replace(scores, blocker=f"{node.name}: baddbmm beta={beta!r}")
    # A symbolic beta scales the bias; it differs from baddbmm only for beta 0 with a non-finite bias.
    term = ScoreTerm(product.bias, "add", _batch_heads(node), float(beta) if is_number(beta) else beta)
    return dataclasses.replace(scores, terms=(term,))


def _masked_scores(node: Node) -> _Scores | None:
    """``scores + term``, ``masked_fill(scores, m, low)`` or ``where(c, scores, low)`` (either order)."""
    candidates: list[tuple[object, object, TermKind, object]] = []  # (scores, term, kind, low)
    added, iadded = ADD.bind(node), IADD.bind(node)
    if added is not None and added["alpha"] == 1:
        operands = (added["input"], added["other"])
        candidates += [(s, t, "add", None) for s, t in (operands, operands[::-1])]
    if iadded is not None:  # in place: only the scores may be the one changed
        candidates.append((iadded["input"], iadded["other"], "add", None))
    filled, chosen = MASKED_FILL.bind(node), WHERE.bind(node)
    if filled is not None:
        candidates.append((filled["input"], filled["mask"], "masked", filled["value"]))
    if chosen is not None:
        candidates.append((chosen["input"], chosen["condition"], "kept", chosen["other"]))
        candidates.append((chosen["other"], chosen["condition"], "masked", chosen["input"]))
    for scores_node, term, kind, low in candidates:
        if not isinstance(term, Node) or (kind != "add" and constant_scalar(low) is None):
            continue
        inner = _scores(scores_node, mask_allowed=True)
        if inner is None:
            continue
        blocker = _term_blocker(node, scores_node, term, kind, low)
        terms = (*inner.terms, ScoreTerm(term, kind, _batch_heads(node)))
        return dataclasses.replace(inner, terms=terms, blocker=inner.blocker or blocker)
    return None


def _batch_heads(scores: Node) -> object:
    """B*H for 3-D ``[B*H, Sq, Skv]`` scores, None for 4-D ones."""
    shape = example_value(scores).shape
    return shape[0] if len(shape) == 3 else None


def _term_blocker(node: Node, scores: Node, term: Node, kind: TermKind, low: object) -> str | None:
    """Why a mask term cannot be part of the op's mask, or None."""
    value, before, mask = example_value(node), example_value(scores), example_value(term)
    if tuple(value.shape) != tuple(before.shape):
        return f"the mask {term.name} broadcasts the scores to a larger shape"
    if kind == "add":
        if mask is not None and not mask.is_floating_point():
            return f"the mask added to the scores is {mask.dtype}, not an additive float mask"
        return None
    if not negligible(constant_scalar(low), value.dtype):
        return f"{node.name} fills masked scores with {constant_scalar(low)!r}, not -inf or finfo.min"
    return None


def _combined_scale(scale: float | Node | None, factor: float | Node) -> float | Node | None:
    """The product of two scalings, None when the op's one ``scale`` argument cannot hold it.

    Numbers multiply; a symbolic factor is kept as the scale only when every other factor is 1.
    """
    if isinstance(scale, float) and isinstance(factor, float):
        return scale * factor
    if scale == 1.0 or factor == 1.0:
        return factor if scale == 1.0 else scale
    return None


def _weights(node: Node) -> _Weights | None:
    """Walk forward from the softmax to the value product (None when the weights never reach one
    as its weights operand): casts, identity or training dropouts, clones, views between 3-D and 4-D."""
    for user in node.users:
        value = value_operand(user, node)
        if value is not None:
            return _Weights((node,), user, value)
        dropout, view = DROPOUT.bind(user), head_view(user)
        copied = COPY.matches(user) and user.args[:1] == (node,)
        if (
            float_cast_source(user) is node
            or (dropout is not None and dropout["input"] is node)
            or copied
            or (view is not None and view.source is node)
        ):
            rest = _weights(user)
            if rest is not None:
                heads = rest.heads | ({view.heads} if view is not None else set())
                return dataclasses.replace(rest, nodes=(node, *rest.nodes), heads=heads)
    return None


def _blocker(scores: _Scores, weights: _Weights, heads: frozenset[int | None]) -> str | None:
    """Why the matched pattern cannot become the op, or None."""
    for node in (*scores.nodes, *weights.nodes):
        if sum(not reads_only_metadata(user, node) for user in node.users) != 1:
            return (
                f"intermediate {node.name} is also used outside the attention "
                "(e.g. returned attention weights)"
            )
    for node in weights.nodes:
        dropout = DROPOUT.bind(node)
        if dropout is not None and not dropout_is_identity(dropout):
            return f"{node.name}: dropout p={dropout['p']!r} in training mode"
    if scores.blocker is not None:
        return scores.blocker
    if scores.scale is None:
        return "the scaling mixes a symbolic factor with other factors (the op takes one scale)"
    if None in heads:
        return "a view between [B*H, S, S] and [B, H, S, S] scores has a symbolic head count"
    if len(heads) > 1:
        return f"the views of the scores disagree on the head count ({sorted(heads)})"
    return None
