"""Decode KV slimming rule (METHOD.md section 4).

On constructed inputs with known answers, and its invariants.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnicompile.config import OmniSparseConfig
from omnicompile.kernels.decode.slim_kv import SlimKV
from omnicompile.slimming import SLIM_BLOCK, long_range_region, plan_slimming, slim

CONFIG = OmniSparseConfig(
    block_size=16, n_sink=1, recent_window=64, obs_window=8, head_mass_eps=0.05, tau_decode=0.95
)
S, D = 320, 32
SINK_AND_RECENT = torch.cat([torch.arange(16), torch.arange(S - 64, S)])


def _keys_with_landmarks(landmarks: dict[int, int]) -> torch.Tensor:
    """[1, 2, S, D] small random keys; key ``pos`` of both KV heads gets a large basis vector ``e_dim``."""
    k = 0.1 * torch.randn(1, 2, S, D)
    for pos, dim in landmarks.items():
        k[..., pos, dim] += 16.0
    return k


def _queries(dims_per_head: list[int]) -> torch.Tensor:
    """[1, H, obs_window, D] observation queries; query head h points at basis vector ``dims_per_head[h]``."""
    q = 0.1 * torch.randn(1, len(dims_per_head), CONFIG.obs_window, D)
    for head, dim in enumerate(dims_per_head):
        q[:, head, :, dim] += 16.0
    return q


def test_local_head_keeps_sink_and_recent_and_needle_head_keeps_the_needle_block():
    recent_token, needle = S - 10, 200  # the recent token is visible to every observation query
    k = _keys_with_landmarks({recent_token: 0, needle: 1})
    # KV head 0: both query heads look at the recent token. KV head 1: one looks recent, one at the needle.
    plan = slim(_queries([0, 0, 0, 1]), k, CONFIG, scale=1 / math.sqrt(D))
    assert plan.local_heads.tolist() == [[True, False]]
    assert torch.equal(plan.kept_indices(0, 0), SINK_AND_RECENT)
    needle_block = torch.arange(needle // SLIM_BLOCK * SLIM_BLOCK, (needle // SLIM_BLOCK + 1) * SLIM_BLOCK)
    assert torch.equal(plan.kept_indices(0, 1), torch.cat([SINK_AND_RECENT, needle_block]).sort().values)
    assert plan.kept_lengths.tolist() == [[80, 96]]
    assert plan.mass_on_region[0, 1] > 0.99 and plan.mass_on_region[0, 0] < 0.01


def test_stored_bytes_match_the_kept_lengths():
    k = _keys_with_landmarks({S - 10: 0, 200: 1})
    v = torch.randn_like(k)
    plan = slim(_queries([0, 0, 0, 1]), k, CONFIG, scale=1 / math.sqrt(D))
    slim_kv = SlimKV.pack(k, v, plan.keep)
    metadata = 2 * 2 * 4 + 4  # int32 offsets and lengths of 2 KV heads, int32 tail length
    assert slim_kv.lengths.tolist() == plan.kept_lengths.tolist()
    assert slim_kv.stored_bytes() == 2 * (80 + 96) * D * 4 + metadata
    assert torch.equal(slim_kv.k_packed[80:], k[0, 1, plan.kept_indices(0, 1)])


def test_visual_spans_make_the_region_the_visual_tokens_only():
    text_token = 40  # long range, but not visual
    k = _keys_with_landmarks({text_token: 0})
    q = _queries([0, 0, 0, 0])
    as_text = slim(q, k, CONFIG, scale=1 / math.sqrt(D))
    assert not as_text.local_heads.any()  # the text token lies in R: retrieval heads keep its block
    assert as_text.kept_lengths.tolist() == [[96, 96]]

    spans = CONFIG.replace(visual_spans=[(100, 180)])
    as_video = slim(q, k, spans, scale=1 / math.sqrt(D))
    assert as_video.local_heads.all()  # nothing visual is looked at: every visual token is dropped
    assert as_video.kept_lengths.tolist() == [[S - 80, S - 80]]
    mask = torch.zeros(S, dtype=torch.bool)
    mask[100:180] = True
    assert torch.equal(slim(q, k, CONFIG, scale=1 / math.sqrt(D), token_mask=mask).keep, as_video.keep)
    with pytest.raises(ValueError, match="not both"):
        long_range_region(S, spans, token_mask=mask)


def test_zero_eps_and_full_tau_keep_everything():
    config = CONFIG.replace(head_mass_eps=0.0, tau_decode=1.0)
    plan = slim(torch.randn(2, 4, 5, D), torch.randn(2, 2, S, D), config, scale=1 / math.sqrt(D))
    assert plan.keep.all()


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    seq_len=st.integers(1, 200),
    tau=st.floats(0.05, 0.999),
    eps=st.floats(0.0, 0.5),
)
def test_plan_invariants(seed, seq_len, tau, eps):
    """Non-R tokens are always kept; local heads keep only them.

    Retrieval heads keep the fewest top blocks reaching tau.
    """
    torch.manual_seed(seed)
    config = OmniSparseConfig(block_size=16, recent_window=32, head_mass_eps=eps, tau_decode=tau)
    observed = torch.rand(2, 3, seq_len) ** 4 / seq_len
    region = long_range_region(seq_len, config)
    plan = plan_slimming(observed, region, config)
    outside = ~plan.region[:, None, :].expand_as(plan.keep)
    assert plan.keep[outside].all()
    assert torch.equal(plan.keep[plan.local_heads], outside[plan.local_heads])
    blocks = -(-seq_len // SLIM_BLOCK)
    pad = blocks * SLIM_BLOCK - seq_len
    block_mass = (
        torch.nn.functional.pad(observed * plan.region[:, None], (0, pad)).view(2, 3, blocks, -1).sum(-1)
    )
    kept_block = (
        torch.nn.functional.pad(plan.keep & plan.region[:, None], (0, pad)).view(2, 3, blocks, -1).any(-1)
    )
    for b, h in (~plan.local_heads).nonzero().tolist():
        kept, total = block_mass[b, h][kept_block[b, h]], plan.mass_on_region[b, h]
        assert kept.sum() >= tau * total * (1 - 1e-5)
        if kept.numel():
            assert kept.sum() - kept.min() < tau * total  # minimal: without its weakest block it falls short
            assert (block_mass[b, h][~kept_block[b, h]] <= kept.min()).all()
