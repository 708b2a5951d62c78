"""Runtime records of what each attention site did, for `omnicompile.explain`.

The op appends a `SiteRun` to every active `Recorder` when it runs; with no recorder active it
records nothing and measures nothing (the hot path stays free of diagnostics).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Iterator

_ACTIVE: contextvars.ContextVar[tuple["Recorder", ...]] = contextvars.ContextVar("omnicompile_recorders", default=())


@dataclass
class SiteRun:
    """One execution of the attention op at one site.

    Attributes:
        site: the graph node name the pass gave the site.
        decision: ``"sparse"`` or ``"dense"`` (what ran).
        reason: why dense ran (empty for sparse).
        shapes: (q, k, v) shapes.
        stats: selection statistics (density, recall, lazy fraction, ...) when measured.
    """

    site: str
    decision: str
    reason: str
    shapes: tuple[tuple[int, ...], ...]
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class Recorder:
    """Collects `SiteRun`s while active; ``measure`` asks the op for exact recall and error."""

    measure: bool = True
    runs: list[SiteRun] = field(default_factory=list)


@contextlib.contextmanager
def recording(measure: bool = True) -> Iterator[Recorder]:
    """Context manager activating a fresh `Recorder` for the ops run inside it."""
    recorder = Recorder(measure=measure)
    token = _ACTIVE.set(_ACTIVE.get() + (recorder,))
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)


def active_recorders() -> tuple[Recorder, ...]:
    """The recorders active in this context (empty in normal runs)."""
    return _ACTIVE.get()
