"""Logit soft-capping (Gemma 2): each scaled score s becomes ``softcap * tanh(s / softcap)`` before the
mask is applied and the softmax taken (transformers' eager Gemma 2 attention).

Every estimator, reference and kernel takes it as the keyword ``softcap`` (None: no cap); the Triton
kernels apply it in base 2 (`triton_utils.soft_cap`) behind a ``SOFTCAP`` constexpr.
"""

from __future__ import annotations

import math

import torch


def check_softcap(softcap: float | None) -> None:
    """Raise ``ValueError`` unless ``softcap`` is None or a finite number > 0."""
    if softcap is None:
        return
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise ValueError(f"softcap must be a finite number > 0 or None, got {softcap!r}")
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a finite number > 0 or None, got {softcap!r}")


def soft_cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``softcap * tanh(scores / softcap)`` (same shape and dtype), or ``scores`` when softcap is None."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap
