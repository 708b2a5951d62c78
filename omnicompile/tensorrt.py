"""Torch-TensorRT lowering: the graph goes to TensorRT, OmniSparse attention runs as a TensorRT plugin.

Entry points: `compile_tensorrt` (the backend's ``lowering="tensorrt"``), `save_tensorrt` (``export``
with ``target="tensorrt"``) and `load_tensorrt`.

Attention stays our kernel through Torch-TensorRT's auto-generated plugins (TensorRT >= 10.7
Quick Deployable Plugins): ``torch_tensorrt.dynamo.conversion.plugins.custom_op(name)`` builds,
from a custom op's schema and fake implementation, a TensorRT plugin (shapes from the fake
implementation, execution calling the op on TensorRT's stream) and the converter that puts it into
the network. Our op's schema has optional arguments, which that mechanism cannot take, so the graph
first gets the plugin-shaped ops of `omnicompile.passes.plugin_attention`. The plugin is a JIT
plugin: the engine calls back into Python, so running an engine needs `register_plugins` (which
`load_tensorrt` calls) in the process.

Torch-TensorRT is imported lazily; without it every entry point raises an ImportError naming the
extra. This path is untested in this project: TensorRT cannot be installed on its machines.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .capture import ExportedModel, dynamic_shapes
from .passes import copy_graph_module
from .passes.plugin_attention import PLUGIN_OPS, use_plugin_attention

INSTALL_HINT = "pip install omnicompile[tensorrt]"
_UNBOUNDED = sys.maxsize - 1  # torch.export's largest Dim max (newer releases use int_oo, which is larger)


def import_torch_tensorrt() -> ModuleType:
    """``torch_tensorrt``, or an ImportError saying how to install it."""
    try:
        import torch_tensorrt
    except ImportError as error:
        raise ImportError(f"the TensorRT lowering needs Torch-TensorRT: {INSTALL_HINT}") from error
    return torch_tensorrt


@functools.cache
def register_plugins() -> None:
    """Generate the TensorRT plugins and converters of the plugin ops (once per process)."""
    import_torch_tensorrt()
    from torch_tensorrt.dynamo.conversion.plugins import custom_op

    for name in PLUGIN_OPS:
        custom_op(name, supports_dynamic_shapes=True)


def compile_tensorrt(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """Compile a rewritten Dynamo graph with Torch-TensorRT's ``torch.compile`` backend.

    ``gm`` is left as it is; a copy gets the plugin ops.
    """
    register_plugins()
    from torch_tensorrt.dynamo.backend import torch_tensorrt_backend

    graph = copy_graph_module(gm)
    use_plugin_attention(graph)
    return torch_tensorrt_backend(graph, example_inputs)


def save_tensorrt(exported: ExportedModel, path: Path) -> Path:
    """Compile an exported model with Torch-TensorRT and save it (an ExportedProgram file) at ``path``.

    Every dynamic dim needs bounds (``torch.export.Dim(name, min=..., max=...)``): TensorRT builds
    its engine for a shape range, optimised for the example shapes.
    """
    arg_inputs = [_trt_input(value, exported.dims) for value in exported.args]
    kwarg_inputs = {name: _trt_input(value, exported.dims) for name, value in exported.kwargs.items()}
    torch_tensorrt = import_torch_tensorrt()
    register_plugins()
    module = exported.program.module()
    use_plugin_attention(module)
    shapes = dynamic_shapes(module, exported.args, exported.kwargs, exported.dims)
    program = torch.export.export(module, exported.args, exported.kwargs, dynamic_shapes=shapes)
    compiled = torch_tensorrt.dynamo.compile(program, arg_inputs=arg_inputs, kwarg_inputs=kwarg_inputs)
    torch_tensorrt.save(
        compiled,
        str(path),
        output_format="exported_program",
        arg_inputs=arg_inputs,
        kwarg_inputs=kwarg_inputs,
    )
    return path


def load_tensorrt(path: str | Path) -> torch.nn.Module:
    """Load a program saved by `save_tensorrt`, ready to call (registers the plugins first)."""
    register_plugins()
    return import_torch_tensorrt().load(str(path)).module()


def _trt_input(value: Any, dims: dict[int, dict[int, Any]]) -> Any:
    """A ``torch_tensorrt.Input`` with the shape range of a tensor with dynamic dims, else ``value``."""
    if not isinstance(value, torch.Tensor) or id(value) not in dims:
        return value
    low, high = list(value.shape), list(value.shape)
    for index, dim in dims[id(value)].items():
        if getattr(dim, "max", _UNBOUNDED) >= _UNBOUNDED:
            raise ValueError(
                f"export(target='tensorrt'): dynamic dim {index} ({dim!r}) needs bounds, "
                "e.g. torch.export.Dim('seq', min=16, max=131072)"
            )
        low[index], high[index] = max(dim.min, 1), dim.max
    return import_torch_tensorrt().Input(
        min_shape=low, opt_shape=list(value.shape), max_shape=high, dtype=value.dtype
    )
