"""Pass: replace hand-written ("eager") attention by ``torch.ops.omnisparse.attention``.

The pattern, as transformers' ``eager_attention_forward`` writes it::

    scores = matmul(q, k.transpose(-2, -1))       # q may already be scaled
    scores = scores * s  |  scores / d             # zero or more constant scalings
    scores = scores + mask                         # optional additive mask (either operand order)
    weights = softmax(scores, dim=-1[, dtype=float32])   # float casts allowed around the softmax
    weights = dropout(weights, p, training)        # optional; only p == 0 or training=False
    out = matmul(weights, v)

with ``repeat_kv`` on k and v folded into ``enable_gqa=True``. The site is ``out``; a site whose
intermediates (scores, weights) are also used elsewhere, e.g. attention weights returned to the
caller, is left untouched: the op does not produce them.

Why an explicit matcher and not Inductor's pattern matcher: ``register_replacement`` traces its
search functions to ATen graphs, while this pass runs on the torch-level Dynamo graph, where one
operation has several spellings (``operator.matmul``, ``torch.matmul``, ``Tensor.matmul``; positional
or keyword arguments) and the optional steps multiply the patterns; its one-user rule also drops a
reused intermediate silently, where this pass must record why. The matcher walks back from each
``softmax`` to the score ``matmul`` and forward to the value ``matmul``, with spellings handled by
`node_patterns.Call`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch.fx import GraphModule, Node

from .attention_site import AttentionCall, rewrite_site
from .node_patterns import (
    ADD,
    DIV,
    DROPOUT,
    MATMUL,
    MUL,
    SOFTMAX,
    TRANSPOSE,
    dropout_is_identity,
    example_value,
    float_cast_source,
    is_number,
    is_scalar_value,
    normalized_dim,
)
from .site_record import PassContext


@dataclass(frozen=True)
class _Scores:
    """The score half of a site: ``matmul(q, kT)``, its scale, the mask, the nodes in between.

    ``scale`` is a number, a symbolic float's node, or None for scalings the op cannot express.
    """

    matmul: Node
    scale: float | Node | None = 1.0
    mask: Node | None = None
    nodes: tuple[Node, ...] = ()


def replace_eager_attention(gm: GraphModule, ctx: PassContext) -> bool:
    """Rewrite the hand-written attention of ``gm`` in place; returns whether the graph changed."""
    changed = False
    for softmax in [node for node in gm.graph.nodes if _is_last_dim_softmax(node)]:
        scores = _scores(SOFTMAX.bind(softmax)["input"], mask_allowed=True)
        weights = _weights(softmax)
        if scores is None or weights is None:
            continue
        weight_nodes, output = weights
        score_args, output_args = MATMUL.bind(scores.matmul), MATMUL.bind(output)
        query, key_t = score_args["input"], score_args["other"]
        key = _untransposed(key_t) or key_t
        call = AttentionCall(query, key, output_args["other"], scores.mask, 0.0, False, scores.scale, False)
        changed |= rewrite_site(gm, ctx, output, "eager", call, _blocker(scores, weight_nodes, key_t))
    return changed


def _is_last_dim_softmax(node: Node) -> bool:
    bound, value = SOFTMAX.bind(node), example_value(node)
    return (
        bound is not None
        and value is not None
        and normalized_dim(bound["dim"], value.dim()) == value.dim() - 1
    )


def _scale_source(node: Node) -> tuple[float | Node, Node] | None:
    """``(factor, x)`` when ``node`` is ``x * factor``, ``factor * x`` or ``x / d`` (factor = 1 / d).

    The factor is a number, or for a multiplication a graph value holding a symbolic float (a
    module's float attribute under ``dynamic=True``).
    """
    bound = MUL.bind(node)
    if bound is not None:
        for x, factor in ((bound["input"], bound["other"]), (bound["other"], bound["input"])):
            if isinstance(x, Node) and example_value(x) is not None and is_scalar_value(factor):
                return (float(factor) if is_number(factor) else factor), x
    bound = DIV.bind(node)
    divisor = bound["other"] if bound is not None and bound["rounding_mode"] is None else None
    if is_number(divisor) and divisor != 0 and isinstance(bound["input"], Node):
        return 1.0 / divisor, bound["input"]
    return None


def _scores(node: object, mask_allowed: bool) -> _Scores | None:
    """Walk back from the softmax input to the score matmul (None if this is not attention).

    ``mask_allowed`` is False once a scaling or a mask was passed: a mask must be added after the
    scaling (a scaled mask is not SDPA's), and only once.
    """
    if not isinstance(node, Node):
        return None
    if MATMUL.bind(node) is not None:
        return _Scores(matmul=node, nodes=(node,))
    inner: _Scores | None = None
    source, scaled, added = float_cast_source(node), _scale_source(node), ADD.bind(node)
    if source is not None:
        inner = _scores(source, mask_allowed)
    elif scaled is not None:
        inner = _scores(scaled[1], mask_allowed=False)
        if inner is not None:
            inner = dataclasses.replace(inner, scale=_combined_scale(inner.scale, scaled[0]))
    elif added is not None and mask_allowed and added["alpha"] == 1:
        operands = (added["input"], added["other"])
        for scores, mask in (operands, operands[::-1]):
            inner = _scores(scores, mask_allowed=False) if isinstance(mask, Node) else None
            if inner is not None:
                inner = dataclasses.replace(inner, mask=mask)
                break
    if inner is None:
        return None
    return dataclasses.replace(inner, nodes=(*inner.nodes, node))


def _combined_scale(scale: float | Node | None, factor: float | Node) -> float | Node | None:
    """The product of two scalings, None when the op's one ``scale`` argument cannot hold it.

    Numbers multiply; a symbolic factor is kept as the scale only when every other factor is 1.
    """
    if isinstance(scale, float) and isinstance(factor, float):
        return scale * factor
    if scale == 1.0 or factor == 1.0:
        return factor if scale == 1.0 else scale
    return None


def _weights(node: Node) -> tuple[tuple[Node, ...], Node] | None:
    """Walk forward from the softmax to the value matmul.

    Returns the nodes from the softmax to the matmul's weights operand (casts and dropouts), and the
    matmul; None when the weights never reach a matmul as its left operand.
    """
    for user in node.users:
        bound = MATMUL.bind(user)
        if bound is not None and bound["input"] is node:
            return (node,), user
        dropout = DROPOUT.bind(user)
        if float_cast_source(user) is node or (dropout is not None and dropout["input"] is node):
            rest = _weights(user)
            if rest is not None:
                return (node, *rest[0]), rest[1]
    return None


def _untransposed(key_t: object) -> Node | None:
    """``k`` when ``key_t`` is ``k`` with its last two dims swapped, else None."""
    bound = TRANSPOSE.bind(key_t) if isinstance(key_t, Node) else None
    value = example_value(key_t)
    if bound is None or value is None or not isinstance(bound["input"], Node):
        return None
    dims = {normalized_dim(bound["dim0"], value.dim()), normalized_dim(bound["dim1"], value.dim())}
    return bound["input"] if dims == {value.dim() - 2, value.dim() - 1} else None


def _blocker(scores: _Scores, weight_nodes: tuple[Node, ...], key_t: object) -> str | None:
    """Why the matched pattern cannot become the op, or None."""
    for node in (*scores.nodes, *weight_nodes):
        if len(node.users) != 1:
            return (
                f"intermediate {node.name} is also used outside the attention "
                "(e.g. returned attention weights)"
            )
    for node in weight_nodes:
        dropout = DROPOUT.bind(node)
        if dropout is not None and not dropout_is_identity(dropout):
            return f"{node.name}: dropout p={dropout['p']!r} in training mode"
    mask = example_value(scores.mask)
    if mask is not None and not mask.is_floating_point():
        return f"the mask added to the scores is {mask.dtype}, not an additive float mask"
    if scores.scale is None:
        return "the scaling mixes a symbolic factor with other factors (the op takes one scale)"
    if _untransposed(key_t) is None:
        return (
            f"the score matmul's right operand {getattr(key_t, 'name', key_t)} "
            "is not a transpose of k's last two dims"
        )
    return None
