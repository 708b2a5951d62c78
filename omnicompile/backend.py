"""The ``omnisparse`` torch.compile backend.

``torch.compile(model, backend="omnisparse")`` works after ``pip install`` with no import (the
``torch_dynamo_backends`` entry point names `omnisparse_backend`). The backend runs the passes of
`omnicompile.passes` on a copy of the Dynamo graph, replacing every attention site it can handle
by ``torch.ops.omnisparse.attention``, then hands the graph to Inductor's ``compile_fx`` (which
goes through AOT autograd, so training graphs get a backward) or, with ``lowering="tensorrt"``,
to Torch-TensorRT.

Configuration: ``torch.compile(model, backend="omnisparse", options={"tau": 0.9, ...})`` (keys are
`OmniSparseConfig` fields; unknown keys are errors), or ``torch.compile(model,
backend=omnicompile.backend(OmniSparseConfig(...)))``.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import ops  # noqa: F401  (registers torch.ops.omnisparse.*)
from .config import OmniSparseConfig
from .passes import PassReport, run_passes

logger = logging.getLogger("omnicompile")

CompiledFn = Callable[..., Any]
_GRAPH_IDS = itertools.count()


def lower(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], cfg: OmniSparseConfig, mode: str | None
) -> CompiledFn:
    """Compile the rewritten ``gm`` with ``cfg.lowering`` (Inductor's ``compile_fx``, with ``mode``'s
    options, or Torch-TensorRT); `compile_graph` and `context_parallel.backend` end with it."""
    if cfg.lowering == "tensorrt":
        from .tensorrt import compile_tensorrt

        return compile_tensorrt(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = list_mode_options(mode) if mode else None
    return compile_fx(gm, example_inputs, config_patches=patches)


def compile_graph(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    cfg: OmniSparseConfig,
    mode: str | None = None,
    reports: list[PassReport] | None = None,
) -> CompiledFn:
    """Rewrite attention in ``gm`` (a copy of it) and lower the result; append the pass report.

    Site names get the prefix ``g<N>.`` with N counting the graphs compiled in this process.
    """
    report = run_passes(gm, cfg, site_prefix=f"g{next(_GRAPH_IDS)}.")
    if reports is not None:
        reports.append(report)
    for site in report.sites:
        if site.status != "replaced":
            logger.info("omnisparse: attention site %s left untouched: %s", site.site, site.reason)
    reasons = Counter(site.reason for site in report.sites if site.status != "replaced")
    if reasons:
        logger.warning(
            "omnisparse: %d of %d attention sites rewritten in graph %s; see omnicompile.explain for why "
            "the others were left untouched (%s)",
            len(report.sites) - reasons.total(),
            len(report.sites),
            report.sites[0].site.split(".")[0],
            "; ".join(f"{count}x {reason}" for reason, count in reasons.items()),
        )
    return lower(report.graph_module, example_inputs, cfg, mode)


def backend(config: OmniSparseConfig | None = None, *, reports: list[PassReport] | None = None) -> CompiledFn:
    """A torch.compile backend for ``config`` (default `OmniSparseConfig()`).

    ``reports``, when given, receives one `PassReport` per compiled graph (used by `explain`).
    """
    cfg = config or OmniSparseConfig()

    def omnisparse(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> CompiledFn:
        return omnisparse_backend(gm, example_inputs, _config=cfg, _reports=reports, **kwargs)

    return omnisparse


def omnisparse_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: dict[str, Any] | None = None,
    mode: str | None = None,
    _config: OmniSparseConfig | None = None,
    _reports: list[PassReport] | None = None,
) -> CompiledFn:
    """The registered ``"omnisparse"`` backend; ``options`` are `OmniSparseConfig` fields."""
    cfg = _config or OmniSparseConfig()
    if options:
        cfg = cfg.replace(**options)
    return compile_graph(gm, example_inputs, cfg, mode, _reports)
