"""The fused Triton row probe equals the PyTorch `reference.probe_block_mass` (attn_mask=None).

Runs under the Triton interpreter on the CPU (tests/conftest.py), tiny shapes, the kernel called
directly (`with_row_probe` takes it on CUDA only): causal and not, sliding windows (narrow and
>= S), GQA, partial last blocks, padded head dims, Sq != Skv (causal top-left aligned, as SDPA),
several row tiles with skipped key tiles, rows that see no key, a logit soft-cap.
"""

from __future__ import annotations

import pytest
import torch

from omnicompile.kernels.estimation.launch import LaunchConfig
from omnicompile.kernels.estimation.reference import probe_block_mass as reference_probe
from omnicompile.kernels.estimation.triton_probe import probe_block_mass, supported

pytestmark = pytest.mark.interpreter

BLOCK = 16
# The probe rows' masses sum to 1 (or 0): tolerances are absolute and relative to that.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3}
SMALL_TILES = LaunchConfig(block_r=16, block_n=16, num_warps=4, num_stages=1)
# 32-key splits of 16-key steps: a row's keys spread over several programs, merged by their statistics.
SPLIT_TILES = LaunchConfig(block_r=16, block_n=16, split_n=32, num_warps=4, num_stages=1)


def _check(q_len, kv_len, dim, is_causal, dtype, window=None, block=BLOCK, launch=None, seed=0, softcap=None):
    gen = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(2, 4, q_len, dim, generator=gen)).to(dtype)
    k = (2 * torch.randn(2, 2, kv_len, dim, generator=gen)).to(dtype)
    scale = dim**-0.5
    got = probe_block_mass(q, k, None, is_causal, scale, block, window=window, softcap=softcap, launch=launch)
    ref = reference_probe(q, k, None, is_causal, scale, block, window=window, softcap=softcap)
    assert got.shape == ref.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.all(got[ref == 0] == 0)  # exactly zero on keys the row cannot see
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [16, 80])
@pytest.mark.parametrize("seq", [75, 128])
@pytest.mark.parametrize(("is_causal", "window"), [(False, None), (True, None), (True, 20), (True, 200)])
def test_matches_reference(dtype, dim, seq, is_causal, window):
    _check(seq, seq, dim, is_causal, dtype, window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("is_causal", "window"), [(False, None), (True, None), (True, 20)])
def test_softcap_matches_reference(dtype, is_causal, window):
    """Scores spread over about +-8 capped at 2, over 32-key splits."""
    _check(128, 100, 16, is_causal, dtype, window, launch=SPLIT_TILES, softcap=2.0)


@pytest.mark.parametrize("launch", [None, SMALL_TILES, SPLIT_TILES])
@pytest.mark.parametrize(
    ("q_len", "kv_len", "is_causal", "window"),
    [(75, 128, True, None), (128, 75, True, None), (75, 128, False, None), (128, 90, True, 20)],
)
def test_unequal_lengths(q_len, kv_len, is_causal, window, launch):
    _check(q_len, kv_len, 16, is_causal, torch.float32, window, launch=launch)


@pytest.mark.parametrize("launch", [SMALL_TILES, SPLIT_TILES])
@pytest.mark.parametrize("window", [None, 20])
def test_several_row_tiles(window, launch):
    # 19 query blocks: two row tiles; 16-key steps: the second tile skips the key tiles before its
    # window (and, causal, none past its rows: they are the last ones); 32-key splits: 10 per row,
    # some wholly outside a tile's keys.
    _check(300, 300, 16, True, torch.float32, window, launch=launch)


@pytest.mark.parametrize("window", [None, 20])
def test_mix_into_estimate(window):
    """With ``ahat``: (ahat + probe) / 2 where the probe row sees a key, ahat elsewhere, in place."""
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 2, 128, 16, generator=gen), torch.randn(1, 2, 40, 16, generator=gen)
    ahat = torch.rand(1, 2, 8, 3, generator=gen)
    probe = reference_probe(q, k, None, True, 0.25, BLOCK, window=window)
    seen = probe.sum(-1, keepdim=True) > 0
    expected = torch.where(seen, (ahat + probe) / 2, ahat)
    got = probe_block_mass(q, k, None, True, 0.25, BLOCK, window=window, ahat=ahat, launch=SPLIT_TILES)
    assert got.data_ptr() == ahat.data_ptr()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [32, 128])
def test_block_sizes(block):
    # 64-key steps over two 32-key blocks; a 128 block raises the step to 128 keys.
    _check(200, 200, 16, True, torch.float32, block=block)


def test_rows_without_keys_are_zero():
    # Window 20 over 40 keys: rows >= 59 see no key (probe rows 63, 79, ...: query blocks 3 on).
    got = _check(128, 40, 16, True, torch.float32, window=20)
    assert torch.all(got[:, :, 3:] == 0)
    torch.testing.assert_close(got[:, :, :3].sum(-1), torch.ones(2, 4, 3))


def test_output_fully_written(monkeypatch):
    empty = torch.empty

    def nan_empty(*size, **kwargs):
        return empty(*size, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", nan_empty)
    got = _check(300, 300, 16, True, torch.float32, window=20, launch=SMALL_TILES)
    assert not got.isnan().any()


def test_supported_refuses_masks():
    q, k = torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)
    assert supported(q, k, None) is None
    assert "attn_mask" in supported(q, k, torch.ones(32, 32, dtype=torch.bool))
    assert "head dim" in supported(torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8), None)
    assert "KV heads" in supported(torch.randn(1, 3, 32, 16), k, None)
