"""The op's log-sum-exp on every CPU path, and `merge_attention` of partial attentions (issue 20).

The lse of the dense SDPA path, the dense soft-capped path and the sparse path (tau = 1: every allowed
block) equals ``torch.logsumexp`` of the explicit scores in fp64; merging the op's results over two
disjoint key sets equals the op over all keys (non-causal without a mask, causal with the later keys
as a bool mask, a bool mask over a random partition of the keys), in dense and sparse mode.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnicompile import OmniSparseConfig, merge_attention
from omnicompile.recording import recording

BLOCK = 16
DENSE = OmniSparseConfig(mode="dense")
SPARSE = OmniSparseConfig(tau=1.0, query_selection=False, block_size=BLOCK, granularity=4, min_seq_len=1)
MODES = {"dense": DENSE, "sparse": SPARSE}
SCALE = 0.3
CAP = 2.0


def _op(q, k, v, mask, causal, config, window=None, softcap=None):
    """The op's (out, lse) and the path that ran."""
    with recording(measure=False) as recorder:
        out, lse = torch.ops.omnisparse.attention(
            q, k, v, mask, 0.0, causal, SCALE, True, config.to_json(), "lse", window, None, softcap
        )
    return out, lse, recorder.runs[0].decision


def _qkv(seed, q_len, kv_len, heads=4, kv_heads=2, dim=16):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, q_len, dim, generator=gen)
    k, v = (torch.randn(1, kv_heads, kv_len, dim, generator=gen) for _ in range(2))
    return q, k, v


def _explicit_lse(q, k, keep, additive=None, softcap=None):
    """fp64 torch.logsumexp of the scores scale * q . k (capped), plus ``additive``, where ``keep``."""
    group = q.shape[1] // k.shape[1]
    scores = SCALE * q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if additive is not None:
        scores = scores + additive.double()
    return torch.logsumexp(scores.masked_fill(~keep, float("-inf")), -1)


def _check_lse(lse, want):
    assert lse.dtype == torch.float32 and lse.shape == want.shape
    seen = torch.isfinite(want)
    assert torch.equal(torch.isfinite(lse), seen) and torch.isneginf(lse[~seen]).all()
    torch.testing.assert_close(lse.double()[seen], want[seen], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("softcap", [None, CAP])
@pytest.mark.parametrize("masking", ["none", "causal", "bool", "additive", "window"])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_lse_equals_logsumexp_of_the_scores(mode, masking, softcap):
    q_len, kv_len = (40, 40) if masking == "window" else (40, 56)
    q, k, v = _qkv(1, q_len, kv_len)
    rows, cols = torch.arange(q_len)[:, None], torch.arange(kv_len)[None, :]
    keep, mask, additive, causal, window = (
        torch.ones(q_len, kv_len, dtype=torch.bool),
        None,
        None,
        False,
        None,
    )
    if masking in ("causal", "window"):
        causal, keep = True, cols <= rows
    if masking == "window":
        window, keep = 12, keep & (cols > rows - 12)
    if masking == "bool":
        mask = keep = torch.rand(q_len, kv_len, generator=torch.Generator().manual_seed(2)) > 0.4
        keep[3] = False  # a row that sees no key
    if masking == "additive":
        additive = torch.randn(1, 4, q_len, kv_len, generator=torch.Generator().manual_seed(3))
        mask = additive.masked_fill(cols > rows + 8, float("-inf"))
        keep = (cols <= rows + 8).expand(1, 4, q_len, kv_len)
    _, lse, path = _op(q, k, v, mask, causal, MODES[mode], window, softcap)
    assert path == mode
    _check_lse(lse, _explicit_lse(q, k, keep, additive, softcap))


def _merged_halves(q, k, v, mask_of, parts, config):
    """`merge_attention` of the op over each key index set in ``parts``, ``mask_of(keys)`` its mask."""
    outs, lses = [], []
    for keys in parts:
        out, lse, _ = _op(q, k[:, :, keys], v[:, :, keys], mask_of(keys), False, config)
        outs.append(out)
        lses.append(lse)
    return merge_attention(outs, lses)


@settings(max_examples=12, deadline=None)
@given(
    q_len=st.integers(BLOCK, 48),
    kv_len=st.integers(2, 64),
    cut=st.floats(0.05, 0.95),
    masking=st.sampled_from(["none", "causal", "bool"]),
    mode=st.sampled_from(["dense", "sparse"]),
    seed=st.integers(0, 2**16),
)
def test_merging_two_halves_equals_the_whole(q_len, kv_len, cut, masking, mode, seed):
    q, k, v = _qkv(seed, q_len, kv_len)
    config = MODES[mode]
    gen = torch.Generator().manual_seed(seed + 1)
    split = min(max(1, round(cut * kv_len)), kv_len - 1)
    if masking == "bool":  # a random partition of the keys, a random mask (rows that see no key too)
        mask = torch.rand(q_len, kv_len, generator=gen) > 0.5
        order = torch.randperm(kv_len, generator=gen)
        parts, whole = (order[:split], order[split:]), _op(q, k, v, mask, False, config)
        out, lse = _merged_halves(q, k, v, lambda keys: mask[:, keys], parts, config)
    else:  # the first keys, then the rest; causal: the rest as the bool mask of its causal entries
        causal = masking == "causal"
        parts, whole = (torch.arange(split), torch.arange(split, kv_len)), _op(q, k, v, None, causal, config)
        rows = torch.arange(q_len)[:, None]
        out, lse = _merged_halves(
            q, k, v, lambda keys: (keys[None, :] <= rows) if causal else None, parts, config
        )
    want_out, want_lse, path = whole
    assert path == mode
    _check_lse(lse, want_lse.double())
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)


def test_merge_of_parts_that_see_no_key():
    """A part with lse -inf weighs nothing; a row no part sees gives out 0 and lse -inf."""
    gen = torch.Generator().manual_seed(0)
    outs = [torch.randn(1, 2, 3, 4, generator=gen) for _ in range(2)]
    lses = [torch.tensor([0.5, float("-inf"), float("-inf")]).expand(1, 2, 3), torch.zeros(1, 2, 3)]
    lses[1][..., 2] = float("-inf")
    out, lse = merge_attention(outs, lses)
    torch.testing.assert_close(out[:, :, 1], outs[1][:, :, 1])
    assert torch.equal(out[:, :, 2], torch.zeros(1, 2, 4)) and torch.isneginf(lse[..., 2]).all()
    torch.testing.assert_close(
        lse[..., 0], torch.logaddexp(torch.tensor(0.5), torch.tensor(0.0)).expand(1, 2)
    )
    with pytest.raises(ValueError, match="one lse per output"):
        merge_attention(outs, lses[:1])


def test_dense_lse_skipped_when_not_needed(monkeypatch):
    """need_lse=False (what the passes insert): dense SDPA runs without the lse pass, lse zeros."""
    from omnicompile import dense

    def fail(*_args):
        raise AssertionError("dense_lse ran")

    monkeypatch.setattr(dense, "dense_lse", fail)
    q, k, v = _qkv(0, 20, 20)
    out, lse = torch.ops.omnisparse.attention(
        q, k, v, None, 0.0, True, None, True, DENSE.to_json(), "s", need_lse=False
    )
    assert torch.equal(lse, torch.zeros(1, 4, 20))
    with pytest.raises(AssertionError, match="dense_lse ran"):
        torch.ops.omnisparse.attention(q, k, v, None, 0.0, True, None, True, DENSE.to_json(), "s")
