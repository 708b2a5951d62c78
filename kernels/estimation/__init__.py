"""Block estimators: Ahat, the estimated attention mass per (query block, key block)."""

from .params import EstimationParams
from .reference import (
    antidiagonal_estimate,
    composite_estimate,
    estimate_blocks,
    pooled_estimate,
    probe_block_mass,
)

__all__ = [
    "EstimationParams",
    "antidiagonal_estimate",
    "composite_estimate",
    "estimate_blocks",
    "pooled_estimate",
    "probe_block_mass",
]
