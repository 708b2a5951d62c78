"""The two products of attention in every spelling model code uses.

The score product ``[..., Sq, D] x [..., D, Skv] -> [..., Sq, Skv]``:

- ``matmul`` / ``@`` / ``bmm`` of ``(q, kT)``;
- ``baddbmm(bias, q, kT, beta=b, alpha=a)``: ``a * q @ kT + b * bias`` (BLOOM adds its ALiBi bias so);
- ``einsum`` with k (``"bhqd,bhkd->bhqk"``) or kT (``"bhqd,bhdk->bhqk"``), operands in either order.

The value product ``[..., Sq, Skv] x [..., Skv, Dv] -> [..., Sq, Dv]``: ``matmul`` / ``@`` / ``bmm``
of ``(weights, v)``, or ``einsum("bhqk,bhkd->bhqd")`` with operands in either order.

An einsum matches only when its batch subscripts (``...`` allowed) are the same, in the same order, in
both operands and the output, and the contracted and kept subscripts are where these forms put
them: ``"bhqd,bhkd->bhkq"`` (the transposed scores) is not a score product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.fx import Node

from .node_patterns import BADDBMM, BMM, EINSUM, MATMUL, PERMUTE, TRANSPOSE, example_value, normalized_dim


@dataclass(frozen=True)
class ScoreProduct:
    """``alpha * q @ kT + beta * bias`` as the graph holds it.

    ``key`` is k ``[..., Skv, D]``, or kT ``[..., D, Skv]`` when ``key_transposed``; ``bias`` is None
    (and ``beta`` 0) except for ``baddbmm``.
    """

    query: Node
    key: Node
    key_transposed: bool
    alpha: Any = 1.0
    bias: Node | None = None
    beta: Any = 0


def score_product(node: Node) -> ScoreProduct | None:
    """``node`` as a score product, or None."""
    for call in (MATMUL, BMM):
        bound = call.bind(node)
        if bound is not None:
            q, k_t = bound["input"], bound["other" if call is MATMUL else "mat2"]
            return ScoreProduct(q, k_t, True) if _nodes(q, k_t) else None
    bound = BADDBMM.bind(node)
    if bound is not None:
        q, k_t, bias = bound["batch1"], bound["batch2"], bound["input"]
        if not _nodes(q, k_t, bias):
            return None
        return ScoreProduct(q, k_t, True, bound["alpha"], bias, bound["beta"])
    einsum = _einsum(node)
    if einsum is None:
        return None
    (a, b), out, (x, y) = einsum
    for (qs, ks), (q, k) in ((a, b), (x, y)), ((b, a), (y, x)):
        if _batch(qs, ks, out) and len({qs[-2], qs[-1], ks[-2], out[-1]} - set(out[:-2])) == 3:
            if qs[-2] == out[-2] and ks[-2] == out[-1] and ks[-1] == qs[-1] != out[-1]:
                return ScoreProduct(q, k, False)
            if qs[-2] == out[-2] and ks[-1] == out[-1] and ks[-2] == qs[-1] != out[-1]:
                return ScoreProduct(q, k, True)
    return None


def value_operand(node: Node, weights: Node) -> Node | None:
    """v when ``node`` is a value product of ``weights`` (as its weights operand) and v, else None."""
    for call in (MATMUL, BMM):
        bound = call.bind(node)
        if bound is not None and bound["input"] is weights:
            value = bound["other" if call is MATMUL else "mat2"]
            return value if isinstance(value, Node) else None
    einsum = _einsum(node)
    if einsum is None:
        return None
    (a, b), out, (x, y) = einsum
    for (ws, vs), (w, v) in ((a, b), (x, y)), ((b, a), (y, x)):
        subscripts = {ws[-2], ws[-1], vs[-1]}
        if w is weights and _batch(ws, vs, out) and len(subscripts - set(out[:-2])) == 3:
            if ws[-2] == out[-2] and vs[-1] == out[-1] and ws[-1] == vs[-2]:
                return v
    return None


def untransposed(key_t: Node) -> Node | None:
    """k when ``key_t`` is k with its last two dims swapped (``transpose`` or ``permute``), else None."""
    value = example_value(key_t)
    if value is None or not isinstance(key_t.args[0] if key_t.args else None, Node):
        return None
    ndim, swapped = value.dim(), False
    bound = TRANSPOSE.bind(key_t)
    if bound is not None:
        dims = {normalized_dim(bound["dim0"], ndim), normalized_dim(bound["dim1"], ndim)}
        swapped = dims == {ndim - 2, ndim - 1}
    elif PERMUTE.matches(key_t):
        dims = key_t.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        order = [normalized_dim(dim, ndim) for dim in key_t.kwargs.get("dims", dims)]
        swapped = order == [*range(ndim - 2), ndim - 1, ndim - 2]
    return key_t.args[0] if swapped else None


Subscripts = tuple[str, ...]


def _einsum(node: Node) -> tuple[tuple[Subscripts, Subscripts], Subscripts, tuple[Node, Node]] | None:
    """``((a, b), out, (x, y))`` for ``einsum("a,b->out", x, y)``: each term's subscripts as a tuple,
    ``...`` one item; None for other nodes, implicit outputs and other operand counts."""
    if not EINSUM.matches(node) or node.kwargs or not node.args or not isinstance(node.args[0], str):
        return None
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    equation = node.args[0].replace(" ", "")
    if len(operands) != 2 or not _nodes(*operands) or equation.count("->") != 1:
        return None
    inputs, out = equation.split("->")
    terms = inputs.split(",")
    if len(terms) != 2:
        return None
    a, b, o = (_subscripts(term) for term in (*terms, out))
    return ((a, b), o, (operands[0], operands[1])) if min(len(a), len(b), len(o)) >= 3 else None


def _subscripts(term: str) -> Subscripts:
    head, dots, tail = term.partition("...")
    return (*head, *((dots,) if dots else ()), *tail)


def _batch(x: Subscripts, y: Subscripts, out: Subscripts) -> bool:
    """The same batch subscripts (all but the last two) in both operands and the output, each once."""
    batch = out[:-2]
    return x[:-2] == y[:-2] == batch and len(set(out)) == len(out)


def _nodes(*args: Any) -> bool:
    return all(isinstance(arg, Node) for arg in args)
