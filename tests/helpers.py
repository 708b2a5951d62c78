"""Shared test helpers (import as `from tests.helpers import ...`).

Per-dtype tolerances and fresh random attention inputs.
"""

from __future__ import annotations

import zlib

import torch

# Relative-error budgets (||out - ref|| / ||ref||) per dtype, for outputs and for gradients.
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
GRAD_REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32; NaN anywhere gives inf."""
    out, ref = out.float(), ref.float()
    if torch.isnan(out).any():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def stable_seed(*parts: object) -> int:
    """A seed from ``parts`` that is the same in every process (``hash`` of a str is salted per process,
    so a failure seeded with it cannot be reproduced)."""
    return zlib.crc32(repr(parts).encode())
