"""`omnicompile.memo.PerForward`: computed once for the same tensors, again for others or after a write."""

from __future__ import annotations

import torch

from omnicompile.memo import PerForward


def test_recomputes_only_when_an_argument_changes() -> None:
    calls = []

    @PerForward
    def total(x: torch.Tensor, scale: int) -> float:
        calls.append(scale)
        return float(x.sum()) * scale

    x = torch.ones(3)
    assert total(x, 2) == total(x, 2) == 6.0 and len(calls) == 1  # same tensor, same value: once
    assert total(x, 3) == 9.0 and len(calls) == 2  # another value
    x.add_(1)  # an in-place write bumps the version
    assert total(x, 3) == 18.0 and len(calls) == 3
    assert total(torch.ones(3), 3) == 9.0 and len(calls) == 4  # another tensor of equal contents
