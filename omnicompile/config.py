"""`OmniSparseConfig`: the one typed, validated configuration of the backend.

Field names, meanings and defaults follow ``docs/METHOD.md`` (the project's copy of the method
definition). Unknown keys are errors, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .kernels.estimation.params import Estimator
from .kernels.selection.params import BudgetScope

Mode = Literal["sparse", "dense"]
Lowering = Literal["inductor", "tensorrt"]

_CHOICES: dict[str, tuple[str, ...]] = {
    "mode": ("sparse", "dense"),
    "estimator": ("composite", "pooled", "antidiagonal"),
    "budget_scope": ("heads", "kv_group", "head"),
    "lowering": ("inductor", "tensorrt"),
}


@dataclass(frozen=True)
class OmniSparseConfig:
    """Configuration of the OmniSparse rewrite and of the sparse attention it runs.

    Method fields (METHOD.md):
        mode: ``"sparse"`` runs the method; ``"dense"`` rewrites attention into the op but always
            runs dense attention (a correctness baseline for the plumbing).
        tau: recall target of the KV selection, in (0, 1].
        block_size: query and key block size b (a power of two, >= 16).
        min_seq_len: key sequences shorter than this run dense (logged).
        max_head_dim: query head dims above this run dense (logged): the Triton forward at D 256
            runs at 0.37x of cuDNN on the blocks it computes, so there the sparse path pays only
            below ~20% density (docs/METHOD.md, "Defaults and why").
        estimator: block estimator, ``"composite"``, ``"pooled"`` or ``"antidiagonal"``.
        granularity: tokens per composite token g (divides ``block_size``).
        antidiagonal_stride: stride s of the antidiagonal estimator (divides ``block_size``).
        row_probe: mix into the estimate the exact block distribution of each query block's last row
            (``kernels/estimation/reference.py``, `probe_block_mass`: composite tokens overrate the local
            blocks of heads whose scores spread widely inside a tile, which made the lazy rule fire wrongly).
        n_sink, n_local: forced sink blocks and local-window blocks.
        query_selection: lazy/active classification of query blocks on or off.
        lazy_threshold: local mass at which a query block is lazy (``None`` = ``tau``).
        min_blocks, max_blocks: clamp of the shared budget K (``None`` = no upper clamp).
        budget_scope: who shares K: ``"heads"``, ``"kv_group"`` or ``"head"``.
        dense_last_blocks: the last query blocks that attend to every allowed key block (the rows
            that produce the next token; a single row's needle is lost in a block average).
        obs_window, recent_window: decode slimming observation queries and recent tokens.
        head_mass_eps, tau_decode: local-head threshold and retrieval-head recall of decode slimming.
        visual_spans: optional ``((start, end), ...)`` token spans (end exclusive) that form the
            long-range region R of decode slimming; ``None`` = everything outside sink and recent.

    Engineering fields:
        dense_fallback_density: a (batch, head) whose selection computes more than this fraction
            of its allowed blocks takes every allowed block instead (exact attention through the
            sparse kernel), decided on the device on every backend; 1.0 disables the rule.
        query_chunk: query blocks processed at once by the pure-PyTorch reference (bounds memory).
        lowering: compiler for the rest of the graph, ``"inductor"`` or ``"tensorrt"``.
    """

    mode: Mode = "sparse"
    tau: float = 0.99
    block_size: int = 64
    min_seq_len: int = 32768
    max_head_dim: int = 128
    estimator: Estimator = "composite"
    granularity: int = 16
    antidiagonal_stride: int = 8
    row_probe: bool = True
    n_sink: int = 1
    n_local: int = 2
    query_selection: bool = True
    lazy_threshold: float | None = None
    min_blocks: int = 0
    max_blocks: int | None = None
    budget_scope: BudgetScope = "head"
    dense_last_blocks: int = 1
    obs_window: int = 64
    recent_window: int = 256
    head_mass_eps: float = 0.05
    tau_decode: float = 0.95
    visual_spans: tuple[tuple[int, int], ...] | None = None
    dense_fallback_density: float = 0.9
    query_chunk: int = 16
    lowering: Lowering = "inductor"

    def __post_init__(self) -> None:
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"OmniSparseConfig.{name}: {value!r} is not one of {choices}")
        self._check_range("tau", self.tau, 0.0, 1.0, low_open=True)
        self._check_range("head_mass_eps", self.head_mass_eps, 0.0, 1.0)
        self._check_range("tau_decode", self.tau_decode, 0.0, 1.0, low_open=True)
        self._check_range("dense_fallback_density", self.dense_fallback_density, 0.0, 1.0, low_open=True)
        if self.lazy_threshold is not None:
            self._check_range("lazy_threshold", self.lazy_threshold, 0.0, 1.0, low_open=True)
        for name in (
            "block_size",
            "granularity",
            "antidiagonal_stride",
            "query_chunk",
            "obs_window",
            "max_head_dim",
        ):
            self._check_int(name, minimum=1)
        for name in ("min_seq_len", "n_sink", "n_local", "min_blocks", "recent_window", "dense_last_blocks"):
            self._check_int(name, minimum=0)
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"OmniSparseConfig.block_size: {self.block_size} is not a power of two >= 16")
        for name in ("granularity", "antidiagonal_stride"):
            if self.block_size % getattr(self, name):
                raise ValueError(
                    f"OmniSparseConfig.{name}: {getattr(self, name)} "
                    f"does not divide block_size {self.block_size}"
                )
        if self.n_local < 1:
            raise ValueError("OmniSparseConfig.n_local: the local window must hold the diagonal block (>= 1)")
        if self.max_blocks is not None:
            self._check_int("max_blocks", minimum=0)
            if self.max_blocks < self.min_blocks:
                raise ValueError(
                    f"OmniSparseConfig.max_blocks: {self.max_blocks} is below min_blocks {self.min_blocks}"
                )
        if self.visual_spans is not None:
            spans = tuple(tuple(int(x) for x in span) for span in self.visual_spans)
            if any(len(s) != 2 or s[0] < 0 or s[1] <= s[0] for s in spans):
                raise ValueError(
                    f"OmniSparseConfig.visual_spans: {self.visual_spans!r} "
                    "must be (start, end) pairs, 0 <= start < end"
                )
            object.__setattr__(self, "visual_spans", spans)
        for name in ("query_selection", "row_probe"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"OmniSparseConfig.{name}: {getattr(self, name)!r} is not a bool")

    def _check_range(self, name: str, value: Any, low: float, high: float, low_open: bool = False) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"OmniSparseConfig.{name}: {value!r} is not a number")
        if not math.isfinite(value):
            raise ValueError(f"OmniSparseConfig.{name}: {value!r} is not a finite number")
        if not low <= value <= high or (low_open and value == low):
            bracket = "(" if low_open else "["
            raise ValueError(f"OmniSparseConfig.{name}: {value!r} is outside {bracket}{low}, {high}]")

    def _check_int(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"OmniSparseConfig.{name}: {value!r} is not an integer >= {minimum}")

    @property
    def effective_lazy_threshold(self) -> float:
        """The lazy threshold in force: ``lazy_threshold`` or, when unset, ``tau``."""
        return self.tau if self.lazy_threshold is None else self.lazy_threshold

    def replace(self, **changes: Any) -> OmniSparseConfig:
        """A copy with ``changes`` applied (validated like the constructor)."""
        return OmniSparseConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON-serialisable)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if out["visual_spans"] is not None:
            out["visual_spans"] = [list(s) for s in out["visual_spans"]]
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> OmniSparseConfig:
        """Build from a mapping; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"OmniSparseConfig: unknown field(s) {unknown}; known fields: {sorted(known)}")
        kwargs = dict(values)
        if kwargs.get("visual_spans") is not None:
            kwargs["visual_spans"] = tuple(tuple(s) for s in kwargs["visual_spans"])
        return cls(**kwargs)

    def to_json(self) -> str:
        """Canonical JSON text, the form in which the config travels inside the graph."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> OmniSparseConfig:
        """Parse the JSON form (cached: the op parses the same text on every call)."""
        return _parse_json(text)


@functools.lru_cache(maxsize=256)
def _parse_json(text: str) -> OmniSparseConfig:
    return OmniSparseConfig.from_dict(json.loads(text))
