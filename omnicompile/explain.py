"""`explain`: compile with the backend, run once, and report every attention site."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .backend import backend
from .config import OmniSparseConfig
from .passes import PassReport, SiteRecord
from .recording import recording


@dataclass
class ExplainSite:
    """One attention site: what the pass saw and what ran.

    Attributes:
        node: graph node name (the site name).
        shapes: q, k, v shapes seen by the pass.
        mask: ``"none"``, ``"causal"``, ``"bool"`` or ``"additive"`` as the op gets it, with the proven
            sliding window (``"causal, window 512"``) or ``" (checked)"`` for a mask checked at run time.
        gqa: whether the site has fewer KV heads than query heads.
        decision: ``"sparse"`` or ``"dense"`` (what the op ran; the last call when it ran several
            times), ``"untouched"`` for a site the pass left alone, ``"not run"`` for a replaced site
            that the run did not reach.
        reason: why dense or untouched ("" for sparse).
        stats: density, dense heads, recall, lazy fraction, budget and error of the last sparse run.
        calls: how many times the op ran at this site.
    """

    node: str
    shapes: tuple[tuple[int, ...], ...]
    mask: str
    gqa: bool
    decision: str
    reason: str
    stats: dict[str, float] = field(default_factory=dict)
    calls: int = 0


@dataclass
class ExplainReport:
    """The sites of every graph compiled for one `explain` call, and the call's output."""

    sites: list[ExplainSite]
    output: Any = None

    def __str__(self) -> str:
        stat_keys = ("density", "dense_heads", "recall_mean", "recall_min", "lazy_fraction", "rel_error")
        header = ["site", "shapes (q | k)", "mask", "gqa", "decision", *stat_keys, "reason"]
        rows = [header]
        for s in self.sites:
            shapes = " | ".join("x".join(map(str, shape)) for shape in s.shapes[:2])
            stats = [f"{s.stats[key]:.3f}" if key in s.stats else "-" for key in stat_keys]
            rows.append([s.node, shapes, s.mask, "yes" if s.gqa else "no", s.decision, *stats, s.reason])
        widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)


def explain(
    fn: torch.nn.Module | Callable[..., Any],
    *args: Any,
    config: OmniSparseConfig | None = None,
    measure: bool = True,
    **kwargs: Any,
) -> ExplainReport:
    """Compile ``fn`` (a module or a function) with the backend, run ``fn(*args, **kwargs)`` once.

    Returns an `ExplainReport` whose ``sites`` list every attention site found; ``measure`` also
    computes exact recall and output error of every sparse run (an extra dense pass per site).
    """
    reports: list[PassReport] = []
    compiled = torch.compile(fn, backend=backend(config, reports=reports))
    with recording(measure=measure) as recorder:
        output = compiled(*args, **kwargs)
    if not reports:
        raise RuntimeError("explain: torch.compile produced no graph (was the function already compiled?)")
    runs: dict[str, list] = {}
    for run in recorder.runs:
        runs.setdefault(run.site, []).append(run)
    sites = []
    for report in reports:
        for site in report.sites:
            site_runs = runs.get(site.site, [])
            if site.status != "replaced":
                decision, reason, stats = "untouched", site.reason, {}
            elif site_runs:
                last = site_runs[-1]
                decision, reason, stats = last.decision, last.reason, last.stats
            else:
                decision, reason, stats = "not run", "", {}
            sites.append(
                ExplainSite(
                    site.site,
                    site.shapes,
                    _mask_text(site),
                    site.gqa,
                    decision,
                    reason,
                    stats,
                    len(site_runs),
                )
            )
    return ExplainReport(sites, output)


def _mask_text(site: SiteRecord) -> str:
    if site.window is not None:
        return f"{site.mask}, window {site.window}"
    return f"{site.mask} (checked)" if site.mask_checked else site.mask
