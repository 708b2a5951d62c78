"""Recognisers for the spellings of torch-level calls in Dynamo graphs.

A Dynamo graph records calls as the user wrote them: ``q @ k`` is ``operator.matmul``, ``torch.matmul``
or the ``matmul`` method, with arguments positional or by keyword. `Call` names one operation's
spellings and binds a node's arguments to parameter names, so the passes match operations, not
spellings.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true


@dataclass(frozen=True)
class Call:
    """One torch operation: its function and method spellings and its parameter names (input first)."""

    functions: frozenset[Callable[..., Any]]
    methods: frozenset[str]
    params: tuple[str, ...] = ("input",)
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def matches(self, node: Node) -> bool:
        """Whether ``node`` calls this operation, in any spelling."""
        if node.op == "call_function":
            return node.target in self.functions
        return node.op == "call_method" and node.target in self.methods

    def bind(self, node: Node) -> dict[str, Any] | None:
        """``node``'s arguments by parameter name, defaults filled in.

        None when ``node`` is not this operation or its arguments do not fit the parameters (an
        unknown keyword, too many positional arguments, a parameter without default left out).
        """
        if (
            not self.matches(node)
            or len(node.args) > len(self.params)
            or not set(node.kwargs) <= set(self.params)
        ):
            return None
        bound = {**self.defaults, **dict(zip(self.params, node.args)), **node.kwargs}
        return bound if set(self.params) <= set(bound) else None


def _call(
    functions: set[Callable[..., Any]],
    methods: set[str],
    params: tuple[str, ...] = ("input",),
    **defaults: Any,
) -> Call:
    return Call(frozenset(functions), frozenset(methods), params, defaults)


MATMUL = _call({torch.matmul, operator.matmul}, {"matmul"}, ("input", "other"))
BMM = _call({torch.bmm}, {"bmm"}, ("input", "mat2"))
BADDBMM = _call({torch.baddbmm}, {"baddbmm"}, ("input", "batch1", "batch2", "beta", "alpha"), beta=1, alpha=1)
# Variadic operands (``einsum(equation, a, b)`` or ``einsum(equation, [a, b])``): only `matches` is used.
EINSUM = _call({torch.einsum}, set())
MUL = _call({torch.mul, operator.mul}, {"mul"}, ("input", "other"))
DIV = _call(
    {torch.div, torch.true_divide, operator.truediv},
    {"div", "true_divide"},
    ("input", "other", "rounding_mode"),
    rounding_mode=None,
)
ADD = _call({torch.add, operator.add}, {"add"}, ("input", "other", "alpha"), alpha=1)
# ``x += y`` on a tensor: in place, so never removable as such (see `cleanup`).
IADD = _call({operator.iadd}, set(), ("input", "other"))
TANH = _call({torch.tanh, F.tanh}, {"tanh"})
# F.softmax's third positional parameter is _stacklevel, torch.softmax's is dtype: both are ignored.
SOFTMAX = _call(
    {F.softmax, torch.softmax},
    {"softmax"},
    ("input", "dim", "_stacklevel", "dtype"),
    _stacklevel=3,
    dtype=None,
)
TRANSPOSE = _call({torch.transpose}, {"transpose"}, ("input", "dim0", "dim1"))
DROPOUT = _call(
    {F.dropout}, set(), ("input", "p", "training", "inplace"), p=0.5, training=True, inplace=False
)
UNSQUEEZE = _call({torch.unsqueeze}, {"unsqueeze"}, ("input", "dim"))
INDEX = _call({operator.getitem}, set(), ("input", "index"))
# Variadic sizes: only `matches` and the input (args[0]) are used.
EXPAND = _call(set(), {"expand"})
RESHAPE = _call({torch.reshape, torch.flatten, torch.unflatten}, {"reshape", "view", "flatten", "unflatten"})
PERMUTE = _call({torch.permute}, {"permute"})
COPY = _call({torch.clone}, {"clone", "contiguous"})
SDPA = _call(
    {F.scaled_dot_product_attention},
    set(),
    ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
)

_CAST_METHODS = frozenset({"float", "half", "bfloat16", "double"})
# Methods that read only the shape, dtype or device of their argument ``other`` (args[1]).
_LIKE_METHODS = frozenset({"type_as", "expand_as", "view_as", "reshape_as"})


def is_number(value: Any) -> bool:
    """A Python int or float constant (not a bool, not a graph value)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_scalar_value(value: Any) -> bool:
    """A number constant, or a graph value holding a (possibly symbolic) Python float."""
    if isinstance(value, Node):
        return isinstance(value.meta.get("example_value"), (float, torch.SymFloat))
    return is_number(value)


def float_cast_source(node: Node) -> Node | None:
    """The input of ``node`` when it only casts a tensor to a floating dtype, else None.

    Spellings: ``x.float()``, ``x.half()``, ``x.bfloat16()``, ``x.double()``, ``x.to(dtype)``,
    ``x.to(dtype=dtype)``, ``x.type(dtype)`` and ``x.type_as(t)`` (t a floating tensor).
    """
    if node.op != "call_method" or not node.args:
        return None
    if node.target in _CAST_METHODS and len(node.args) == 1 and not node.kwargs:
        return node.args[0]
    if node.target == "type_as" and len(node.args) == 2 and not node.kwargs:
        other = example_value(node.args[1])
        return node.args[0] if other is not None and other.is_floating_point() else None
    if node.target in ("to", "type") and set(node.kwargs) <= {"dtype"}:
        dtypes = [*node.args[1:], *node.kwargs.values()]
        if len(dtypes) == 1 and isinstance(dtypes[0], torch.dtype) and dtypes[0].is_floating_point:
            return node.args[0]
    return None


def reads_only_metadata(user: Node, node: Node) -> bool:
    """Whether ``user`` reads only the shape, dtype or device of ``node`` (``node.size()``,
    ``node.dim()``, ``node.shape``, ``x.type_as(node)``, ``x.expand_as(node)``, ...), not its values."""
    if user.op == "call_method" and user.args and user.args[0] is node:
        return user.target in ("size", "dim")
    if user.op == "call_method" and user.target in _LIKE_METHODS:
        return node not in user.args[:1] and node not in user.kwargs.values()
    return (
        user.op == "call_function"
        and user.target is getattr
        and user.args[1:] in (("shape",), ("dtype",), ("device",))
    )


def dropout_is_identity(bound: Mapping[str, Any]) -> bool:
    """Whether a bound `DROPOUT` call returns its input unchanged (``p == 0`` or ``training=False``)."""
    return bound["training"] is False or (is_number(bound["p"]) and bound["p"] == 0)


def example_value(node: Any) -> torch.Tensor | None:
    """The fake tensor Dynamo recorded for ``node`` (``meta["example_value"]``), or None."""
    value = node.meta.get("example_value") if isinstance(node, Node) else None
    return value if isinstance(value, torch.Tensor) else None


def known_equal(a: Any, b: Any) -> bool:
    """``a == b`` for ints or SymInts, true only when provable without adding guards."""
    return statically_known_true(a == b)


def normalized_dim(dim: Any, ndim: int) -> int | None:
    """A constant dim index made non-negative, or None when it is not a valid constant."""
    if not isinstance(dim, int) or isinstance(dim, bool) or not -ndim <= dim < ndim:
        return None
    return dim % ndim
