"""Causal sliding windows and finfo.min masks in the pure-PyTorch paths: masks, the estimation and
sparse-attention references against their materialised-mask forms (``masks.window_mask``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from omnicompile.config import OmniSparseConfig
from omnicompile.kernels.estimation.reference import estimate_blocks
from omnicompile.kernels.masks import allowed_blocks, mask_bias, window_mask
from omnicompile.kernels.selection.transpose import selection_from_block_mask
from omnicompile.kernels.sparse_attention.reference import sparse_attention
from omnicompile.method import estimation_params

BLOCK = 16
# (q_len, kv_len, window): windows that are and are not multiples of the block, partial blocks,
# Sq != Skv, and window >= Skv (plain causal).
WINDOWS = [(64, 64, 16), (70, 70, 10), (80, 58, 26), (48, 80, 32), (60, 60, 128)]


@pytest.mark.parametrize("q_len, kv_len, window", WINDOWS)
def test_allowed_blocks_window_is_tile_any_of_window_mask(q_len, kv_len, window):
    dense = window_mask(q_len, kv_len, window, "cpu")
    expected = allowed_blocks(dense, False, 1, 1, q_len, kv_len, BLOCK, "cpu")
    got = allowed_blocks(None, True, 1, 1, q_len, kv_len, BLOCK, "cpu", window=window)
    assert torch.equal(got, expected)
    if window >= q_len:
        assert torch.equal(got, allowed_blocks(None, True, 1, 1, q_len, kv_len, BLOCK, "cpu"))


@pytest.mark.parametrize("q_len, kv_len, window", WINDOWS)
def test_mask_bias_window_equals_window_mask(q_len, kv_len, window):
    q_pos = torch.arange(-2, q_len + 2).view(1, 1, -1, 1)
    k_pos = torch.arange(-2, kv_len + 2).view(1, 1, 1, -1)
    bias = mask_bias(None, True, q_len, kv_len, q_pos, k_pos, window=window)
    keep = F.pad(window_mask(q_len, kv_len, window, "cpu"), (2, 2, 2, 2), value=False)
    assert torch.equal(bias[0, 0] == 0, keep) and torch.equal(torch.isneginf(bias[0, 0]), ~keep)


@pytest.mark.parametrize(
    "window, is_causal, with_mask, message",
    [(4, False, False, "is_causal=True"), (4, False, True, "attn_mask=None"), (0, True, False, ">= 1")],
)
def test_window_rejects(window, is_causal, with_mask, message):
    mask = torch.ones(16, 16, dtype=torch.bool) if with_mask else None
    pos = torch.arange(16).view(1, 1, -1, 1)
    with pytest.raises(ValueError, match=message):
        allowed_blocks(mask, is_causal, 1, 1, 16, 16, BLOCK, "cpu", window=window)
    with pytest.raises(ValueError, match=message):
        mask_bias(mask, is_causal, 16, 16, pos, pos.mT, window=window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finfo_min_counts_as_masked(dtype):
    """transformers' masks: finfo.min where masked. A tile of finfo.min only is not allowed, and its
    bias is -inf, as for the same mask in bool or -inf form."""
    keep = window_mask(80, 80, 21, "cpu")
    additive = torch.zeros(80, 80, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
    got = allowed_blocks(additive, False, 1, 1, 80, 80, BLOCK, "cpu")
    assert torch.equal(got, allowed_blocks(keep, False, 1, 1, 80, 80, BLOCK, "cpu"))
    assert not got.all()  # the band leaves whole tiles masked
    pos = torch.arange(80)
    bias = mask_bias(additive, False, 80, 80, pos.view(1, 1, -1, 1), pos.view(1, 1, 1, -1))
    assert torch.equal(torch.isneginf(bias[0, 0]), ~keep)


@pytest.mark.parametrize("estimator", ["composite", "pooled", "antidiagonal"])
@pytest.mark.parametrize("q_len, kv_len, window", WINDOWS)
def test_estimate_window_equals_window_mask(estimator, q_len, kv_len, window):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, q_len, 16, generator=gen)
    k = torch.randn(1, 2, kv_len, 16, generator=gen)
    cfg = OmniSparseConfig(block_size=BLOCK, granularity=2, antidiagonal_stride=4, estimator=estimator)
    got = estimate_blocks(q, k, None, True, None, estimation_params(cfg), window=window)
    expected = estimate_blocks(
        q, k, window_mask(q_len, kv_len, window, "cpu"), False, None, estimation_params(cfg)
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    allowed = allowed_blocks(None, True, 1, 4, q_len, kv_len, BLOCK, "cpu", window=window)
    assert torch.all(got[~allowed.expand_as(got)] == 0)


@pytest.mark.parametrize("q_len, kv_len, window", WINDOWS)
def test_sparse_reference_window_equals_sdpa(q_len, kv_len, window):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, q_len, 16, generator=gen)
    k, v = torch.randn(2, 1, 2, kv_len, 16, generator=gen)
    allowed = allowed_blocks(None, True, 1, 4, q_len, kv_len, BLOCK, "cpu", window=window)
    selection = selection_from_block_mask(allowed.expand(1, 4, -1, -1), BLOCK, q_len, kv_len)
    out, lse = sparse_attention(q, k, v, selection, None, True, None, window=window)
    mask = window_mask(q_len, kv_len, window, "cpu")
    seen = mask.any(-1)  # rows past Skv see nothing: out 0, lse -inf
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out[:, :, seen], expected[:, :, seen], rtol=1e-5, atol=1e-5)
    assert torch.all(out[:, :, ~seen] == 0) and torch.all(torch.isneginf(lse[:, :, ~seen]))
