"""Row probe (`probe_block_mass` of kernels/estimation/reference.py): exact against dense softmax rows,
and the mixed estimate."""

from __future__ import annotations

import pytest
import torch

from omnicompile import OmniSparseConfig
from omnicompile.kernels.estimation import estimate_blocks
from omnicompile.kernels.estimation.reference import composite_estimate, probe_block_mass, with_row_probe
from omnicompile.kernels.masks import allowed_blocks, window_mask
from omnicompile.method import estimation_params

BLOCK = 16


def _dense_rows(q, k, mask, scale, rows):
    """Softmax rows of the materialised scores (tiny shapes only), bool mask [Sq, Skv], GQA expanded."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1)[:, :, rows]


@pytest.mark.parametrize("kind", ["causal", "window", "bool-padded"])
def test_probe_is_the_exact_last_row_mass(kind):
    gen = torch.Generator().manual_seed(0)
    q_len = kv_len = 75  # a partial last block
    q = torch.randn(2, 4, q_len, 8, generator=gen) * 2
    k = torch.randn(2, 2, kv_len, 8, generator=gen) * 2
    causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril()
    if kind == "causal":
        mask, attn_mask, is_causal = causal, None, True
    elif kind == "window":
        mask = window_mask(q_len, kv_len, 20, "cpu")
        attn_mask, is_causal = mask, False
    else:
        mask = causal.clone()
        mask[:, 60:] = False  # padding keys
        attn_mask, is_causal = mask, False
    got = probe_block_mass(q, k, attn_mask, is_causal, 0.3, BLOCK, chunk_elements=2 * 4 * 2 * 80)
    rows = torch.tensor([15, 31, 47, 63, 74])
    probs = _dense_rows(q, k, mask, 0.3, rows)
    expected = torch.nn.functional.pad(probs, (0, 80 - kv_len)).view(2, 4, 5, 5, BLOCK).sum(-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_mixed_estimate_is_a_distribution_over_allowed_blocks():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 96, 8, generator=gen), torch.randn(1, 2, 96, 8, generator=gen)
    mask = window_mask(96, 96, 40, "cpu")
    ahat = composite_estimate(q, k, mask, False, 0.35, BLOCK, 4, 2)
    mixed = with_row_probe(ahat, q, k, mask, False, 0.35, BLOCK)
    allowed = allowed_blocks(mask, False, 1, 2, 96, 96, BLOCK, "cpu").expand_as(mixed)
    assert (mixed >= 0).all() and (mixed[~allowed] == 0).all()
    torch.testing.assert_close(mixed.sum(-1), torch.ones(1, 2, 6), rtol=0, atol=1e-5)
    probe = probe_block_mass(q, k, mask, False, 0.35, BLOCK, chunk_elements=1)
    torch.testing.assert_close(mixed, (ahat + probe) / 2)
    cfg = OmniSparseConfig(block_size=BLOCK, granularity=4, query_chunk=2)
    torch.testing.assert_close(estimate_blocks(q, k, mask, False, 0.35, estimation_params(cfg)), mixed)
    torch.testing.assert_close(
        estimate_blocks(q, k, mask, False, 0.35, estimation_params(cfg.replace(row_probe=False))), ahat
    )
