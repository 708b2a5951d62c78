"""Prove that a graph value is one constant number: a Python number, or a 0-d tensor built from numbers.

Model code builds scalars as tensors: DeBERTa divides its scores by
``torch.sqrt(torch.tensor(head_dim, dtype=torch.float) * scale_factor)``, GPT-2 masks with
``torch.full([], torch.finfo(dtype).min, dtype=dtype)``, DistilBERT with
``torch.tensor(torch.finfo(dtype).min)``. Under Dynamo those are nodes whose inputs are all constants;
`constant_scalar` evaluates such a node for real, on the CPU, and returns the number. Only the pure
operations listed here are evaluated; anything else (a placeholder, a buffer, a random draw) is not
a proven constant.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx import Node

from .node_patterns import example_value, is_number

_FUNCTIONS = frozenset({
    torch.tensor, torch.full, torch.scalar_tensor, torch.sqrt, torch.rsqrt, torch.mul, torch.div,
    torch.add, torch.sub, operator.mul, operator.truediv, operator.add, operator.sub, operator.neg,
})  # fmt: skip
_METHODS = frozenset({"to", "type", "float", "double", "half", "bfloat16", "sqrt", "rsqrt", "mul", "div"})


def constant_scalar(value: Any) -> float | None:
    """The number ``value`` always holds, or None when that is not proven."""
    if is_number(value):
        return float(value)
    tensor = _constant_tensor(value)
    return None if tensor is None else float(tensor)


def _constant_tensor(node: Any) -> torch.Tensor | None:
    """The value of a one-element tensor node computed from constants only, evaluated on the CPU."""
    recorded = example_value(node)
    if recorded is None or recorded.numel() != 1:
        return None
    if not (
        (node.op == "call_function" and node.target in _FUNCTIONS)
        or (node.op == "call_method" and node.target in _METHODS)
    ):
        return None
    args = [_constant_arg(arg) for arg in node.args]
    kwargs = {key: _constant_arg(arg) for key, arg in node.kwargs.items() if key != "device"}
    if any(arg is _UNKNOWN for arg in (*args, *kwargs.values())):
        return None
    with unset_fake_temporarily():  # real numbers, whatever mode the backend is called under
        if node.op == "call_method":
            result = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            result = node.target(*args, **kwargs)
    return result if isinstance(result, torch.Tensor) and result.numel() == 1 else None


_UNKNOWN = object()


def _constant_arg(arg: Any) -> Any:
    if isinstance(arg, Node):
        tensor = _constant_tensor(arg)
        return _UNKNOWN if tensor is None else tensor
    if isinstance(arg, (list, tuple)):
        items = [_constant_arg(item) for item in arg]
        return _UNKNOWN if any(item is _UNKNOWN for item in items) else type(arg)(items)
    return arg
