"""Capture a model as an exported program with its attention rewritten into the op (shared by
`omnicompile.export`, which packages it with AOTInductor, and `omnicompile.tensorrt`).

How the rewrite reaches the exported program: Dynamo captures the model as a torch-level graph
(``torch._dynamo.export``), `omnicompile.passes.run_passes` rewrites it, exactly as the
``omnisparse`` backend does, and ``torch.export.export`` traces the rewritten graph into the
exported program (the op is opaque there, with its fake implementation giving shapes). Rejected:
an aten-level replacement pass over ``torch.export``'s graph would repeat the site matching (SDPA
call forms, hand-written attention, ``repeat_kv`` folding) in a second IR and could drift from the
backend; a ``TorchFunctionMode`` swapping ``F.scaled_dot_product_attention`` during export sees
only SDPA calls, never hand-written attention. Capturing twice costs seconds, not minutes.

Model outputs that are ``dict`` subclasses (transformers' ``ModelOutput``) are returned as plain
dicts, so the package's output spec deserialises without the model's library.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch._dynamo.exc import UserError, UserErrorType
from torch.export import Dim, ExportedProgram
from torch.fx.experimental.symbolic_shapes import ConstraintViolationError
from torch.utils._pytree import tree_map

from .config import OmniSparseConfig
from .passes import PassReport, run_passes
from .passes.inline_attention import InlineRecord, inline_attention

logger = logging.getLogger("omnicompile")

# input name -> {dim index: a name (equal names are one dim) or a torch.export.Dim}
DynamicSpec = Mapping[str, Mapping[int, Any]]

# Dim("x") is a Dim instance in recent torch, a type (of metaclass _Dim) in older releases;
# Dim.AUTO is a hint.
_DIM_TYPES = (type(Dim("_")), type(Dim.AUTO))


@dataclass(frozen=True)
class ExportedModel:
    """A rewritten, exported model and what `export` needs to package it.

    Attributes:
        program: the exported program, attention sites replaced by the op.
        report: the pass report (one record per attention site found).
        args, kwargs: the example inputs, as passed to the model.
        dims: the dynamic dims, ``{id(example tensor): {dim index: Dim}}`` (empty = all static).
        inlined: one `passes.inline_attention.InlineRecord` per op call when inlined, else empty.
    """

    program: ExportedProgram
    report: PassReport
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    dims: dict[int, dict[int, Any]]
    inlined: tuple[InlineRecord, ...] = ()


def export_program(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] | Mapping[str, Any],
    config: OmniSparseConfig | None = None,
    dynamic: DynamicSpec | None = None,
    inline: bool = False,
) -> ExportedModel:
    """Capture, rewrite and ``torch.export`` ``model`` (arguments as `export`), without packaging;
    ``inline``: replace the op calls whose path is known at export by that path
    (`passes.inline_attention`)."""
    cfg = config or OmniSparseConfig()
    args, kwargs = _split_inputs(example_inputs)
    dims = _resolve_dynamic(model, args, kwargs, dynamic)
    wrapped = _PlainOutputs(model)
    with _dynamic_errors(dynamic):
        # Static but for the dims asked for (Dynamo's export default makes every dim symbolic), so
        # that the graph's example values say which shapes the exported program fixes.
        graph, _guards = torch._dynamo.export(
            wrapped, dynamic_shapes=dynamic_shapes(wrapped, args, kwargs, dims), assume_static_by_default=True
        )(*args, **kwargs)
    report = run_passes(graph, cfg)
    _check_sites(report, model)
    rewritten = report.graph_module
    inlined = inline_attention(rewritten) if inline else ()
    with _dynamic_errors(dynamic):
        program = torch.export.export(
            rewritten, args, kwargs, dynamic_shapes=dynamic_shapes(rewritten, args, kwargs, dims)
        )
    return ExportedModel(program, report, args, kwargs, dims, inlined)


class _PlainOutputs(torch.nn.Module):
    """``model`` with ``dict`` subclasses in its output (``ModelOutput``) turned into plain dicts."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return _plain(self.model(*args, **kwargs))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_plain(item) for item in value)
    return value


def _split_inputs(
    example_inputs: Sequence[Any] | Mapping[str, Any],
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    return tuple(example_inputs), {}


def _resolve_dynamic(
    model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic: DynamicSpec | None
) -> dict[int, dict[int, Any]]:
    """`export`'s ``dynamic`` as ``{id(example tensor): {dim index: Dim}}`` (empty when it is None).

    Positional inputs are named by ``model.forward``'s parameters; equal dim names give one Dim.
    """
    if not dynamic:
        return {}
    inputs = {**dict(zip(_positional_names(model, len(args)), args)), **kwargs}
    unknown = sorted(set(dynamic) - set(inputs))
    if unknown:
        raise ValueError(f"export: dynamic names input(s) {unknown}, but the inputs are {sorted(inputs)}")
    named: dict[str, Any] = {}
    return {id(inputs[name]): _dims_of(name, inputs[name], dims, named) for name, dims in dynamic.items()}


def dynamic_shapes(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    dims: Mapping[int, Mapping[int, Any]],
) -> dict[str, Any] | None:
    """The ``torch.export`` dynamic-shape spec for ``module(*args, **kwargs)``.

    Each tensor's dims come from ``dims``. Keyed by ``module.forward``'s bound argument names, as
    ``torch.export`` binds them.
    """
    if not dims:
        return None
    bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments

    def spec(leaf: Any) -> Any:
        return dims.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None

    return {name: tree_map(spec, value) for name, value in bound.items()}


def _positional_names(model: torch.nn.Module, count: int) -> list[str]:
    params = [
        p.name
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if count > len(params):
        raise ValueError(
            f"export: {count} positional inputs, but {type(model).__name__}.forward takes {len(params)}"
        )
    return params[:count]


def _dims_of(name: str, value: Any, dims: Mapping[int, Any], named: dict[str, Any]) -> dict[int, Any]:
    """``{dim index: Dim}`` for one input; ``named`` holds the Dims made for names so far."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"export: dynamic names input {name!r}, which is a {type(value).__name__}, not a tensor"
        )
    resolved: dict[int, Any] = {}
    for index, dim in dims.items():
        if isinstance(index, bool) or not isinstance(index, int) or not -value.dim() <= index < value.dim():
            raise ValueError(
                f"export: dynamic dim {index!r} of {name!r} is not a dim of its shape {tuple(value.shape)}"
            )
        if isinstance(dim, str):
            dim = named.setdefault(dim, Dim(dim))
        elif not isinstance(dim, _DIM_TYPES):
            raise TypeError(
                f"export: dynamic dim {index} of {name!r} is {dim!r}: give a name or a torch.export.Dim"
            )
        resolved[index % value.dim()] = dim
    return resolved


@contextlib.contextmanager
def _dynamic_errors(dynamic: DynamicSpec | None) -> Iterator[None]:
    """Turn a constraint violation (a dim marked dynamic that the model fixes) into a ValueError."""
    try:
        yield
    except (UserError, ConstraintViolationError) as error:
        if isinstance(error, UserError) and error.error_type != UserErrorType.CONSTRAINT_VIOLATION:
            raise
        raise ValueError(
            f"export: unsupported dynamic dimension in {dict(dynamic or {})}: {error}"
        ) from error


def _check_sites(report: PassReport, model: torch.nn.Module) -> None:
    for site in report.sites:
        if site.status != "replaced":
            logger.info("omnisparse export: attention site %s left untouched: %s", site.site, site.reason)
    if not any(site.status == "replaced" for site in report.sites):
        found = "; ".join(f"{s.site}: {s.reason}" for s in report.sites) or "no attention site found"
        raise ValueError(
            f"export: nothing in {type(model).__name__} can become OmniSparse attention ({found})"
        )
