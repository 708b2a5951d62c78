"""Runtime records of what each attention site did, for `omnicompile.explain`.

The op appends a `SiteRun` to every active `Recorder` when it runs; with no recorder active it
records nothing and measures nothing (the hot path stays free of diagnostics).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field

_ACTIVE: contextvars.ContextVar[tuple[Recorder, ...]] = contextvars.ContextVar(
    "omnicompile_recorders", default=()
)


@dataclass
class SiteRun:
    """One execution of the attention op at one site.

    Attributes:
        site: the graph node name the pass gave the site.
        decision: ``"sparse"`` or ``"dense"`` (what ran).
        reason: why dense ran (empty for sparse).
        shapes: (q, k, v) shapes.
        stats: selection statistics (density, recall, lazy fraction, ...) when measured.
        inputs: (q, k, attn_mask, is_causal, scale, softcap) when the recorder asked to keep this run's
            inputs.
    """

    site: str
    decision: str
    reason: str
    shapes: tuple[tuple[int, ...], ...]
    stats: dict[str, float] = field(default_factory=dict)
    inputs: tuple | None = None


@dataclass
class Recorder:
    """Collects `SiteRun`s while active.

    ``measure`` asks the op for exact recall and error; ``keep_run`` (an index into ``runs``) asks
    it to keep that run's inputs, e.g. to plot one layer's selection.
    """

    measure: bool = True
    keep_run: int | None = None
    runs: list[SiteRun] = field(default_factory=list)


@contextlib.contextmanager
def recording(measure: bool = True, keep_run: int | None = None) -> Iterator[Recorder]:
    """Context manager activating a fresh `Recorder` for the ops run inside it."""
    recorder = Recorder(measure=measure, keep_run=keep_run)
    token = _ACTIVE.set(_ACTIVE.get() + (recorder,))
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)


def active_recorders() -> tuple[Recorder, ...]:
    """The recorders active in this context (empty in normal runs)."""
    return _ACTIVE.get()
