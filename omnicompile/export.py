"""Export a model with its attention rewritten into ``torch.ops.omnisparse.attention``.

`export` captures the model (`omnicompile.capture.export_program`: every attention site it can
take, SDPA calls and hand-written attention, rewritten into the op with the given config) and
packages the result with AOTInductor (a ``.pt2`` file for `omnicompile.load_package`) or, with
``target="tensorrt"``, with Torch-TensorRT.

An AOTInductor package compiles in, by default, what each attention call runs where that is
known at export (`passes.inline_attention`: dense attention as aten ops; on CUDA with static shapes,
the sparse method's Triton kernels through the triton op ``omnisparse::sparse_attention``). A
package where every call is inlined runs without Python (``cpp/run_package``, `cpp_runner`); the
other calls stay the Python custom op, which AOTInductor calls back through the dispatcher, so
loading needs omnicompile: `omnicompile.load_package` registers it and, on CUDA, works around the
GPU image's libstdc++ crash at load (docs/EXPORT.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from .capture import DynamicSpec, ExportedModel, export_program
from .config import OmniSparseConfig

Target = Literal["aoti", "tensorrt"]
_TARGETS = ("aoti", "tensorrt")

__all__ = ["DynamicSpec", "ExportedModel", "Target", "export", "export_program"]


def export(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] | Mapping[str, Any],
    path: str | Path,
    config: OmniSparseConfig | None = None,
    dynamic: DynamicSpec | None = None,
    target: Target = "aoti",
    inline: bool = True,
) -> Path:
    """Export ``model`` with OmniSparse attention and package it at ``path``; returns the path.

    Args:
        model: the module; its attention (SDPA or hand-written) is rewritten, the rest kept.
        example_inputs: positional inputs (a sequence) or keyword inputs (a mapping), e.g.
            ``{"input_ids": ids, "use_cache": False}`` for a transformers causal LM.
        path: the package file (``.pt2`` for AOTInductor).
        config: the op's configuration (default `OmniSparseConfig()`).
        dynamic: dynamic dims by input name, e.g. ``{"input_ids": {1: "seq"}}``; a dim is a name
            (equal names are one dim) or a ``torch.export.Dim`` (to give bounds). None: all static.
        target: ``"aoti"`` (AOTInductor package) or ``"tensorrt"`` (Torch-TensorRT program).
        inline: (``"aoti"``) compile each attention call whose path is known at export into the
            package (`passes.inline_attention`; the others stay the Python op, the reason logged);
            False keeps every call the op (its per-call decisions, logging and recording).

    Raises:
        ValueError: unknown target, a model with no attention the op can take, a ``dynamic`` entry
            naming no input or no dim of it, or a dim the model does not let vary.
        TypeError: a ``dynamic`` entry for a non-tensor input, or a dim that is not a name or a Dim.
        ImportError: ``target="tensorrt"`` without Torch-TensorRT installed.
    """
    if target not in _TARGETS:
        raise ValueError(f"export: target {target!r} is not one of {_TARGETS}")
    if target == "tensorrt":
        from .tensorrt import import_torch_tensorrt, save_tensorrt

        import_torch_tensorrt()  # fail before the capture, not after it
        return save_tensorrt(export_program(model, example_inputs, config, dynamic), Path(path))
    from torch._inductor import aoti_compile_and_package

    exported = export_program(model, example_inputs, config, dynamic, inline=inline)
    return Path(aoti_compile_and_package(exported.program, package_path=str(path)))
