"""Block estimators: Ahat, the estimated attention mass per (query block, key block)."""

from .reference import (
    antidiagonal_estimate,
    composite_estimate,
    estimate_blocks,
    pooled_estimate,
)

__all__ = [
    "antidiagonal_estimate",
    "composite_estimate",
    "estimate_blocks",
    "pooled_estimate",
]
