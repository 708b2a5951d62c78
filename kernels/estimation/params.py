"""`EstimationParams`: what the block estimators read (METHOD.md section 1), built by
``omnicompile.method.estimation_params`` from the config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Estimator = Literal["composite", "pooled", "antidiagonal"]


@dataclass(frozen=True)
class EstimationParams:
    """Parameters of the estimation stage.

    Attributes:
        estimator: ``"composite"``, ``"pooled"`` or ``"antidiagonal"`` (``reference`` module docstring).
        block_size: query and key block size b.
        granularity: tokens per composite token g (divides b).
        antidiagonal_stride: stride s of the antidiagonal estimator (divides b).
        row_probe: mix in the exact row probe (`reference.with_row_probe`).
        query_chunk: query blocks processed at once by the pure-PyTorch reference.
    """

    estimator: Estimator
    block_size: int
    granularity: int
    antidiagonal_stride: int
    row_probe: bool
    query_chunk: int
