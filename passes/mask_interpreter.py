"""Abstract interpretation of the subgraph that builds an attention mask (values of `mask_values`).

`MaskInterpreter.value(node)` is the `mask_values.Value` that ``node`` holds at every run, or None
(unknown). The vocabulary, which covers what transformers (5.x) emits for causal, sliding-window
and packed-sequence masks under torch.compile:

- ``arange`` (constant start and step), ``+``/``-`` of integer values, ``neg``, ``*`` by a constant;
- ``unsqueeze``, basic ``getitem`` (None, Ellipsis, constant ints and slices), ``expand``, advanced
  ``getitem`` with affine index tensors provably in range (``pos[b_idx, q_idx]``);
- comparisons (``<=``, ``<``, ``>=``, ``>``, ``==``, ``!=``), ``&``, ``|``, ``~`` of predicates;
- ``new_ones``/``new_zeros``/``new_full``/``ones``/``zeros``/``full``/``*_like``/``tensor`` constants;
- ``diff`` (with ``prepend`` continuing the values) and ``cumsum`` of a constant (packed-sequence
  detection on unpacked positions: all equal);
- casts and moves (``to``, ``bool``, ``long``, ``float``, ...; checked against the recorded dtypes),
  ``torch.where(pred, 0, low)`` and ``masked_fill(., pred, low)`` for additive masks.

Everything else (placeholders such as a padding ``attention_mask``, symbolic offsets, other ops) is
unknown, and unknown propagates. Each node's recorded example value gives its shape and dtype.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .mask_values import ALL, Additive, Affine, Comparison, FloatConst, Pred, Value, aligned, negligible
from .node_patterns import (
    ADD,
    EXPAND,
    INDEX,
    MUL,
    PERMUTE,
    RESHAPE,
    TRANSPOSE,
    UNSQUEEZE,
    Call,
    example_value,
    is_number,
    normalized_dim,
)


def _call(functions: set, methods: set, params: tuple[str, ...] = ("input",), **defaults: Any) -> Call:
    return Call(frozenset(functions), frozenset(methods), params, defaults)


_FACTORY = dict(dtype=None, device=None, layout=None, requires_grad=False, pin_memory=False)
ARANGE = _call({torch.arange}, set(), ("start", "end", "step", *_FACTORY), end=None, step=1, **_FACTORY)
SUB = _call({torch.sub, operator.sub}, {"sub"}, ("input", "other", "alpha"), alpha=1)
NEG = _call({torch.neg, operator.neg}, {"neg"})
# Methods are matched in their dunder spellings too: transformers 5.17 writes ``a.__eq__(b)``.
COMPARISONS: dict[Comparison, Call] = {
    name: _call({getattr(torch, name), getattr(operator, name)}, {name, f"__{name}__"}, ("input", "other"))
    for name in ("le", "lt", "ge", "gt", "eq", "ne")
}
AND = _call(
    {operator.and_, torch.logical_and, torch.bitwise_and},
    {"logical_and", "bitwise_and", "__and__"},
    ("input", "other"),
)
OR = _call(
    {operator.or_, torch.logical_or, torch.bitwise_or},
    {"logical_or", "bitwise_or", "__or__"},
    ("input", "other"),
)
NOT = _call(
    {operator.invert, torch.logical_not, torch.bitwise_not}, {"logical_not", "bitwise_not", "__invert__"}
)
CAST = _call(
    set(), {"to", "type", "bool", "long", "int", "float", "half", "bfloat16", "double", "contiguous", "clone"}
)
# Constants; variadic sizes, so only `matches` is used and the fill value is found by `_fill_value`.
CONSTANT = _call(
    {torch.ones, torch.zeros, torch.full, torch.ones_like, torch.zeros_like, torch.full_like, torch.tensor},
    {"new_ones", "new_zeros", "new_full"},
)
WHERE = _call({torch.where}, set(), ("condition", "input", "other"))
MASKED_FILL = _call({torch.masked_fill}, {"masked_fill"}, ("input", "mask", "value"))
DIFF = _call(
    {torch.diff}, {"diff"}, ("input", "n", "dim", "prepend", "append"), n=1, dim=-1, prepend=None, append=None
)
CUMSUM = _call({torch.cumsum}, {"cumsum"}, ("input", "dim", "dtype"), dtype=None)

Handler = Callable[["MaskInterpreter", Node, torch.Tensor], "Value | None"]


def _is_int(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _rounded(value: float, dtype: torch.dtype) -> float:
    return torch.tensor(value, dtype=torch.float64).to(dtype).item()


def _relinear(
    value: Value, transform: Callable[[tuple[int, ...]], tuple[tuple[int, ...], int] | None], shape: tuple
) -> Value | None:
    """``value`` under a change of coordinates x = offset-map(x'): ``transform`` turns the coefficients
    into the new ones and the constant they add (None: not expressible)."""
    if isinstance(value, FloatConst):
        return value
    if isinstance(value, Additive):
        keep = _relinear(value.keep, transform, shape)
        return Additive(keep, value.low) if isinstance(keep, Pred) else None
    result = transform(value.coefs if isinstance(value, Affine) else value.form)
    if result is None:
        return None
    coefs, offset = result
    if isinstance(value, Affine):
        return Affine.of(coefs, value.const + offset, shape)
    return Pred.of(coefs, value.values.shifted(-offset), shape)


def _fit(value: Value | None, out: torch.Tensor) -> Value | None:
    """``value`` as the value of ``out`` (its dims and dtype), None when they disagree."""
    ndim, shape, dtype = out.dim(), tuple(out.shape), out.dtype
    if isinstance(value, Affine) and _is_int(dtype) and len(value.coefs) <= ndim:
        return Affine.of(aligned(value.coefs, ndim), value.const, shape)
    if isinstance(value, Pred) and dtype == torch.bool and len(value.form) <= ndim:
        return Pred.of(aligned(value.form, ndim), value.values, shape)
    if isinstance(value, FloatConst) and dtype.is_floating_point:
        return value
    if isinstance(value, Additive) and negligible(value.low, dtype) and len(value.keep.form) <= ndim:
        return Additive(Pred.of(aligned(value.keep.form, ndim), value.keep.values, shape), value.low)
    return None


class MaskInterpreter:
    """Values of graph nodes, memoised (one interpreter per graph)."""

    def __init__(self) -> None:
        self._memo: dict[Node, Value | None] = {}

    def value(self, arg: object) -> Value | None:
        """The value of a node or a Python constant argument (None: unknown)."""
        if isinstance(arg, bool):
            return Pred.constant(arg)
        if isinstance(arg, int):
            return Affine((), arg)
        if isinstance(arg, float):
            return FloatConst(arg)
        if not isinstance(arg, Node):
            return None
        if arg not in self._memo:
            self._memo[arg] = self._evaluate(arg)
        return self._memo[arg]

    def _evaluate(self, node: Node) -> Value | None:
        out = example_value(node)
        if out is None or written_in_place(node):
            return None
        for call, handler in _HANDLERS:
            if call.matches(node):
                return _fit(handler(self, node, out), out)
        return None


_IN_PLACE_FUNCTIONS = frozenset({
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.iand,
    operator.ior, operator.ixor,
})  # fmt: skip
_IN_PLACE_DUNDERS = frozenset(f"__{function.__name__}__" for function in _IN_PLACE_FUNCTIONS)


def _is_in_place_method(name: str) -> bool:
    """``x.fill_(...)``, ``x.masked_fill_(...)``, ``x.__setitem__(...)``, ``x.__iadd__(...)``, ...
    (not ``x.__eq__(...)``, which transformers writes)."""
    return name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.startswith("__"))


def written_in_place(node: Node) -> bool:
    """Whether some node writes ``node``'s storage in place (``x[i] = v``, ``x.fill_(v)``, ``x += y``),
    directly or through a view or a cast of it (which may return ``x`` itself): Dynamo keeps using
    ``x``'s node after such a write, so its value is not what the node's own operation made."""
    for user in node.users:
        if not user.args or user.args[0] is not node:
            continue
        in_place_method = user.op == "call_method" and _is_in_place_method(user.target)
        if user.target in _IN_PLACE_FUNCTIONS or in_place_method:
            return True
        if any(call.matches(user) for call in _ALIASING) and written_in_place(user):
            return True
    return False


def _arange(interp: MaskInterpreter, node: Node, out: torch.Tensor) -> Value | None:
    bound = ARANGE.bind(node)
    if bound is None:
        return None
    start = 0 if bound["end"] is None else bound["start"]
    if not (isinstance(start, int) and isinstance(bound["step"], int)) or isinstance(start, bool):
        return None
    return Affine((bound["step"],), start)


def _add_sub(sign: int, call: Call) -> Handler:
    def handler(interp: MaskInterpreter, node: Node, out: torch.Tensor) -> Value | None:
        bound = call.bind(node)
        if bound is None or bound["alpha"] != 1:
            return None
        a, b = interp.value(bound["input"]), interp.value(bound["other"])
        return a.plus(b, sign) if isinstance(a, Affine) and isinstance(b, Affine) else None

    return handler


def _neg(interp: MaskInterpreter, node: Node, out: torch.Tensor) -> Value | None:
    bound = NEG.bind(node)
    a = interp.value(bound["input"]) if bound else None
    return a.times(-1) if isinstance(a, Affine) else None


def _mul(interp: MaskInterpreter, node: Node, out: torch.Tensor) -> Value | None:
    bound = MUL.bind(node)
    if bound is None:
        return None
    a, b = interp.value(bound["input"]), interp.value(bound["other"])
    if not (isinstance(a, Affine) and isinstance(b, Affine)):
        return None
    if any(b.coefs):
        a, b = b, a
    return None if any(b.coefs) else a.times(b.const)


def _compare(op: Comparison) -> Handler:
    def handler(interp: MaskInterpreter, node: Node, out: torch.Tensor) -> Value | None:
        bound = COMPARISONS[op].bind(node)
        a, b = (interp.value(bound["input"]), interp.value(bound["other"])) if bound else (None, None)
        if not (isinstance(a, Affine) and isinstance(b, Affine)):
            return None
        diff = a.plus(b, -1)
        return Pred.compare(Affine(aligned(diff.coefs, out.dim()), diff.const), op, tuple(out.shape))

    return handler


def _logic(call: Call, op: str) -> Handler:
    def handler(interp: MaskInterpreter, node: Node, out: torch.Tensor) -> Value | None:
        bound = call.bind(node)
        a, b = (interp.value(bound["input"]), interp.value(bound["other"])) if bound else (None, None)
        return a.combine(b, op) if isinstance(a, Pred) and isinstance(b, Pred) else None

    return handler


def _not(interp: MaskInterpreter, node: Node, out: torch.Tensor) -> Value | None:
    bound = NOT.bind(node)
    a = interp.value(bound["input"]) if bound else None
    return ~a if isinstance(a, Pred) else None


def _unsqueeze(interp: MaskInterpreter, node: Node, out: torch.Tensor) -> Value | None:
    bound = UNSQUEEZE.bind(node)
    dim = normalized_dim(bound["dim"], out.dim()) if bound else None
    value = interp.value(bound["input"]) if bound else None
    if dim is None or value is None:
        return None
    return _relinear(value, lambda c: ((*c[:dim], 0, *c[dim:]), 0), tuple(out.shape))


def _expand(interp: MaskInterpreter, node: Node, out: torch.Tensor) -> Value | None:
    value = interp.value(node.args[0]) if node.args else None
    if value is None:
        return None
    return _relinear(
        value, lambda c: (aligned(c, out.dim()), 0) if len(c) <= out.dim() else None, tuple(out.shape)
    )


def _getitem(interp: MaskInterpreter, node: Node, out: torch.Tensor) -> Value | None:
    bound = INDEX.bind(node)
    source = example_value(bound["input"]) if bound else None
    value = interp.value(bound["input"]) if bound else None
    if source is None or value is None:
        return None
    index = bound["index"] if isinstance(bound["index"], tuple) else (bound["index"],)
    if index and all(isinstance(i, Node) for i in index):
        return _advanced_index(interp, value, source, index, out)
    if any(isinstance(i, Node) for i in index):
        return None
    return _basic_index(value, source, index, out)


def _basic_index(value: Value, source: torch.Tensor, index: tuple, out: torch.Tensor) -> Value | None:
    if not all(i is None or i is Ellipsis or isinstance(i, slice) or is_number(i) for i in index):
        return None
    consumed = sum(i is not None and i is not Ellipsis for i in index)
    ellipses = sum(i is Ellipsis for i in index)
    if consumed > source.dim() or ellipses > 1:
        return None
    entries: list[Any] = []
    for i in index:
        entries.extend([slice(None)] * (source.dim() - consumed) if i is Ellipsis else [i])
    entries.extend([slice(None)] * ((source.dim() - consumed) * (1 - ellipses)))

    def transform(coefs: tuple[int, ...]) -> tuple[tuple[int, ...], int] | None:
        new, offset, dim = [], 0, 0
        for entry in entries:
            if entry is None:
                new.append(0)
                continue
            coef, size = (coefs[dim] if dim < len(coefs) else 0), source.shape[dim]
            dim += 1
            start = _start(entry.start if isinstance(entry, slice) else entry, size)
            if start is None:
                return None
            offset += coef * start
            if isinstance(entry, slice):
                step = 1 if entry.step is None else entry.step
                if not isinstance(step, int) or step < 1:
                    return None
                new.append(coef * step)
        return tuple(new), offset

    return _relinear(value, transform, tuple(out.shape))


def _start(start: object, size: object) -> int | None:
    """A constant start index made non-negative (None: symbolic, or negative with a symbolic size)."""
    if start is None:
        return 0
    if not isinstance(start, int) or isinstance(start, bool):
        return None
    if start >= 0:
        return start
    return start + size if isinstance(size, int) and start + size >= 0 else None


def _in_range(index: Affine, shape: Sequence[Any], size: Any) -> bool:
    """Whether every entry of an affine index tensor of ``shape`` is provably in [0, size)."""
    lo = hi = index.const
    for coef, n in zip(aligned(index.coefs, len(shape)), shape):
        span = coef * (n - 1)
        lo, hi = (lo, hi + span) if coef >= 0 else (lo + span, hi)
    return statically_known_true(lo >= 0) and statically_known_true(hi < size)


def _advanced_index(
    interp: MaskInterpreter, value: Value, source: torch.Tensor, index: tuple[Node, ...], out: torch.Tensor
) -> Value | None:
    """``source[i_0, ..., i_{n-1}]`` with every dim indexed by an affine tensor (result: their broadcast)."""
    indices = [interp.value(i) for i in index]
    if len(index) != source.dim() or not all(
        isinstance(v, Affine) and _in_range(v, tuple(example_value(i).shape), size)
        for v, i, size in zip(indices, index, source.shape)
    ):
        return None
    ndim = out.dim()

    def transform(coefs: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
        new, offset = (0,) * ndim, 0
        for coef, idx in zip(coefs, indices):
            new = tuple(a + coef * b for a, b in zip(new, aligned(idx.coefs, ndim)))
            offset += coef * idx.const
        return new, offset

    return _relinear(value, transform, tuple(out.shape))


def _fill_value(node: Node) -> object:
    name = getattr(node.target, "__name__", node.target)
    if name in ("ones", "ones_like", "new_ones"):
        return 1
    if name in ("zeros", "zeros_like", "new_zeros"):
        return 0
    if name == "new_full":
        return node.args[2] if len(node.args) > 2 else node.kwargs.get("fill_value")
    if name in ("full", "full_like"):
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("fill_value")
    return node.args[0] if node.args else node.kwargs.get("data")  # torch.tensor(data)


def _constant(interp: MaskInterpreter, node: Node, out: torch.Tensor) -> Value | None:
    fill = _fill_value(node)
    if not (is_number(fill) or isinstance(fill, bool)):
        return None
    if out.dtype == torch.bool:
        return Pred.constant(bool(fill), out.dim())
    if _is_int(out.dtype):
        return Affine((0,) * out.dim(), int(fill)) if int(fill) == fill else None
    return FloatConst(_rounded(float(fill), out.dtype)) if out.dtype.is_floating_point else None


def _cast(interp: MaskInterpreter, node: Node, out: torch.Tensor) -> Value | None:
    source = example_value(node.args[0]) if node.args else None
    value = interp.value(node.args[0]) if node.args else None
    if source is None or value is None:
        return None
    src, dst = source.dtype, out.dtype
    if src == dst:
        return value
    if isinstance(value, Affine) and dst == torch.bool:
        return Pred.compare(value, "ne", tuple(source.shape))
    if isinstance(value, Affine) and _is_int(dst):
        return value
    if isinstance(value, Pred) and value.is_constant() and not dst.is_complex:
        return _constant_of(value.values == ALL, out)
    if isinstance(value, FloatConst) and dst.is_floating_point:
        return FloatConst(_rounded(value.value, dst))
    if isinstance(value, Additive) and dst.is_floating_point:
        return Additive(value.keep, _rounded(value.low, dst))
    return None


def _constant_of(fill: bool, out: torch.Tensor) -> Value | None:
    if out.dtype == torch.bool:
        return Pred.constant(fill, out.dim())
    if _is_int(out.dtype):
        return Affine((0,) * out.dim(), int(fill))
    return FloatConst(float(fill))


def _where(interp: MaskInterpreter, node: Node, out: torch.Tensor) -> Value | None:
    bound = WHERE.bind(node)
    if bound is None:
        return None
    cond, a, b = (interp.value(bound[name]) for name in ("condition", "input", "other"))
    if not (isinstance(cond, Pred) and isinstance(a, FloatConst) and isinstance(b, FloatConst)):
        return None
    if a.value == 0 and negligible(b.value, out.dtype):
        return Additive(cond, b.value)
    if b.value == 0 and negligible(a.value, out.dtype):
        return Additive(~cond, a.value)
    return None


def _masked_fill(interp: MaskInterpreter, node: Node, out: torch.Tensor) -> Value | None:
    bound = MASKED_FILL.bind(node)
    if bound is None:
        return None
    base, mask, fill = interp.value(bound["input"]), interp.value(bound["mask"]), bound["value"]
    if not isinstance(mask, Pred):
        return None
    if isinstance(base, Pred) and isinstance(fill, bool):
        return base.combine(mask, "or") if fill else base.combine(~mask, "and")
    if not (is_number(fill) and negligible(float(fill), out.dtype)):
        return None
    if isinstance(base, FloatConst) and base.value == 0:
        return Additive(~mask, _rounded(float(fill), out.dtype))
    if isinstance(base, Additive):
        keep = base.keep.combine(~mask, "and")
        return Additive(keep, max(base.low, _rounded(float(fill), out.dtype))) if keep else None
    return None


def _diff(interp: MaskInterpreter, node: Node, out: torch.Tensor) -> Value | None:
    """``diff`` of an affine value along ``dim`` is its coefficient there, when ``prepend`` (if any)
    holds the values one step before the first."""
    bound = DIFF.bind(node)
    source = example_value(bound["input"]) if bound else None
    value = interp.value(bound["input"]) if bound else None
    dim = normalized_dim(bound["dim"], source.dim()) if source is not None else None
    if not isinstance(value, Affine) or dim is None or bound["n"] != 1 or bound["append"] is not None:
        return None
    coefs = aligned(value.coefs, source.dim())
    if bound["prepend"] is not None:
        prepend = interp.value(bound["prepend"])
        expected = Affine((*coefs[:dim], 0, *coefs[dim + 1 :]), value.const - coefs[dim])
        if (
            not isinstance(prepend, Affine)
            or Affine(aligned(prepend.coefs, source.dim()), prepend.const) != expected
        ):
            return None
    return Affine((0,) * out.dim(), coefs[dim])


def _cumsum(interp: MaskInterpreter, node: Node, out: torch.Tensor) -> Value | None:
    bound = CUMSUM.bind(node)
    value = interp.value(bound["input"]) if bound else None
    dim = normalized_dim(bound["dim"], out.dim()) if bound else None
    if isinstance(value, Pred) and value.is_constant():
        step = int(value.values == ALL)
    elif isinstance(value, Affine) and not any(value.coefs):
        step = value.const
    else:
        return None
    if dim is None:
        return None
    return Affine(tuple(step if i == dim else 0 for i in range(out.dim())), step)


_HANDLERS: tuple[tuple[Call, Handler], ...] = (
    (ARANGE, _arange),
    (ADD, _add_sub(1, ADD)),
    (SUB, _add_sub(-1, SUB)),
    (NEG, _neg),
    (MUL, _mul),
    *((call, _compare(op)) for op, call in COMPARISONS.items()),
    (AND, _logic(AND, "and")),
    (OR, _logic(OR, "or")),
    (NOT, _not),
    (UNSQUEEZE, _unsqueeze),
    (EXPAND, _expand),
    (INDEX, _getitem),
    (CONSTANT, _constant),
    (CAST, _cast),
    (WHERE, _where),
    (MASKED_FILL, _masked_fill),
    (DIFF, _diff),
    (CUMSUM, _cumsum),
)

MASK_CALLS: tuple[Call, ...] = tuple(call for call, _ in _HANDLERS)
"""Every operation the interpreter knows: all pure, so the cleanup may remove them once unused."""

# Operations whose result may share its input's storage (views, and casts that may return the input).
_ALIASING: tuple[Call, ...] = (UNSQUEEZE, EXPAND, INDEX, CAST, RESHAPE, TRANSPOSE, PERMUTE)
