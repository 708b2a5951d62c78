"""What the op returns for a query row whose mask allows no key (README, "Fully masked rows").

Pinned on the CPU: a bool mask all False and an additive mask all -inf give zeros in dense and sparse
mode (as SDPA here; eager softmax attention gives NaN); an additive mask all ``finfo.min`` gives the
uniform average of the values in dense mode (as SDPA and eager attention: the row's scores are all
equal) and zeros in sparse mode (the kernels count values <= finfo.min / 2 as masked). The lse of such a
row is -inf in every case and mode (values <= finfo.min / 2 count as masked). Other rows equal SDPA in
both modes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import omnicompile.ops  # noqa: F401  (registers torch.ops.omnisparse.attention)
from omnicompile.config import OmniSparseConfig
from tests.helpers import REL_TOL, rel_error

B, H, S, D, ROW = 1, 2, 128, 16, 5
SPARSE = OmniSparseConfig(block_size=64, min_seq_len=64, tau=0.9)


def _inputs(kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, S, D] and a causal mask [S, S] whose row ROW allows no key, in the form ``kind``."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=gen) for _ in range(3))
    keep = torch.ones(S, S, dtype=torch.bool).tril()
    keep[ROW] = False
    if kind == "bool":
        return q, k, v, keep
    fill = float("-inf") if kind == "-inf" else torch.finfo(torch.float32).min
    return q, k, v, torch.zeros(S, S).masked_fill(~keep, fill)


def _op(q, k, v, mask, config: OmniSparseConfig) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.omnisparse.attention(q, k, v, mask, 0.0, False, None, False, config.to_json(), "t")


def _eager(q, k, v, mask) -> torch.Tensor:
    scores = q @ k.transpose(-1, -2) * D**-0.5
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("kind", ["bool", "-inf", "finfo.min"])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_fully_masked_row(kind: str, mode: str) -> None:
    q, k, v, mask = _inputs(kind)
    out, lse = _op(q, k, v, mask, SPARSE.replace(mode=mode))
    sdpa, eager = F.scaled_dot_product_attention(q, k, v, attn_mask=mask), _eager(q, k, v, mask)
    uniform = v.mean(dim=2)  # [B, H, D]: equal weights on every key
    if kind == "finfo.min":
        assert torch.allclose(sdpa[:, :, ROW], uniform, atol=1e-5)
        assert torch.allclose(eager[:, :, ROW], uniform, atol=1e-5)
    else:
        assert torch.equal(sdpa[:, :, ROW], torch.zeros_like(uniform))
        assert torch.isnan(eager[:, :, ROW]).all()
    expected = uniform if (mode, kind) == ("dense", "finfo.min") else torch.zeros_like(uniform)
    assert torch.allclose(out[:, :, ROW], expected, atol=1e-5)
    assert torch.isneginf(lse[:, :, ROW]).all()
    others = torch.arange(S) != ROW
    assert rel_error(out[:, :, others], sdpa[:, :, others]) <= REL_TOL[torch.float32]
    assert torch.isfinite(lse[:, :, others]).all()
