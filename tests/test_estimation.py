"""Block estimators: invariant 1 (a distribution over allowed blocks) and the METHOD.md definitions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnicompile import OmniSparseConfig
from omnicompile.kernels.estimation import (
    antidiagonal_estimate,
    composite_estimate,
    estimate_blocks,
    pooled_estimate,
)
from omnicompile.kernels.masks import allowed_blocks
from omnicompile.method import estimation_params
from tests.attention_cases import Case, cases, dense_bias, make_mask, make_qkv

BLOCK = 16


def _summary(x: torch.Tensor, start: int, group: int, kind: str, reverse: bool) -> torch.Tensor:
    """Summary of tokens [start, start + group) of x [B, H, S, D] (those that exist), float64."""
    rows = x[:, :, start : start + group].double()
    if kind == "composite":
        return rows.mean(2)
    padded = torch.cat(
        [rows, rows.new_zeros(rows.shape[0], rows.shape[1], group - rows.shape[2], rows.shape[3])], 2
    )
    return (padded.flip(2) if reverse else padded).flatten(2)


def definition_estimate(
    q: torch.Tensor, k: torch.Tensor, attn_mask, is_causal: bool, scale: float, group: int, kind: str
) -> torch.Tensor:
    """METHOD.md section 1 written out group by group, in float64 (small sizes only)."""
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    k = k.repeat_interleave(heads // k.shape[1], 1)
    bias = dense_bias(attn_mask, is_causal, q_len, kv_len).double().expand(batch, heads, q_len, kv_len)
    nq, nk = -(-q_len // BLOCK), -(-kv_len // BLOCK)
    score_scale = scale if kind == "composite" else scale / group
    key_starts = list(range(0, kv_len, group))
    keys = torch.stack([_summary(k, c, group, kind, reverse=False) for c in key_starts], 2)
    ahat = torch.zeros(batch, heads, nq, nk, dtype=torch.float64)
    for i in range(nq):
        total = torch.zeros(batch, heads, nk, dtype=torch.float64)
        groups = torch.zeros(batch, heads, 1, dtype=torch.float64)
        for r in range(i * BLOCK, min((i + 1) * BLOCK, q_len), group):
            query = _summary(q, r, group, kind, reverse=True)
            count = torch.stack(
                [bias[:, :, r : r + group, c : c + group].logsumexp((-1, -2)) for c in key_starts], -1
            )
            scores = torch.einsum("bhd,bhwd->bhw", query, keys) * score_scale + count
            seen = torch.isfinite(scores).any(-1, keepdim=True)
            probs = scores.softmax(-1).nan_to_num(0.0)
            for w, c in enumerate(key_starts):
                total[:, :, c // BLOCK] += probs[:, :, w]
            groups += seen
        ahat[:, :, i] = total / groups.clamp(min=1)
    return ahat


def _estimate(kind: str, q, k, attn_mask, is_causal, scale, group, chunk):
    if kind == "composite":
        return composite_estimate(q, k, attn_mask, is_causal, scale, BLOCK, group, chunk)
    return antidiagonal_estimate(q, k, attn_mask, is_causal, scale, BLOCK, group, chunk)


@settings(max_examples=15, deadline=None)
@given(case=cases, kind=st.sampled_from(["composite", "antidiagonal"]), group=st.sampled_from([1, 4, 16]))
def test_estimators_follow_the_definition(case: Case, kind: str, group: int):
    """Composite and anti-diagonal estimates equal the group-by-group definition (fp32 vs fp64)."""
    q, k, _ = make_qkv(case)
    attn_mask, is_causal = make_mask(case)
    ahat = _estimate(kind, q, k, attn_mask, is_causal, 0.3, group, chunk=2)
    ref = definition_estimate(q, k, attn_mask, is_causal, 0.3, group, kind)
    torch.testing.assert_close(ahat.double(), ref, atol=2e-6, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(
    case=cases,
    estimator=st.sampled_from(["composite", "pooled", "antidiagonal"]),
    query_chunk=st.integers(1, 3),
)
def test_estimate_is_a_distribution_over_allowed_blocks(case: Case, estimator: str, query_chunk: int):
    """Invariant 1: >= 0, sums to 1 over allowed blocks (rows with any).

    Exactly 0 on disallowed blocks, > 0 on allowed ones.
    """
    q, k, _ = make_qkv(case)
    attn_mask, is_causal = make_mask(case)
    cfg = OmniSparseConfig(
        block_size=BLOCK, granularity=4, antidiagonal_stride=4, estimator=estimator, query_chunk=query_chunk
    )
    ahat = estimate_blocks(q, k, attn_mask, is_causal, case.dim**-0.5, estimation_params(cfg))
    allowed = allowed_blocks(
        attn_mask, is_causal, case.batch, case.heads, case.q_len, case.kv_len, BLOCK, "cpu"
    )
    allowed = allowed.expand_as(ahat)
    assert ahat.dtype == torch.float32 and ahat.shape == (
        case.batch,
        case.heads,
        -(-case.q_len // BLOCK),
        -(-case.kv_len // BLOCK),
    )
    assert (ahat[~allowed] == 0).all()
    assert (ahat[allowed] > 0).all()
    has_allowed = allowed.any(-1)
    torch.testing.assert_close(
        ahat.sum(-1)[has_allowed], torch.ones_like(ahat.sum(-1)[has_allowed]), atol=1e-5, rtol=0
    )
    assert (ahat.sum(-1)[~has_allowed] == 0).all()


def test_query_chunk_does_not_change_the_estimate():
    case = Case(2, 4, 2, 100, 77, 16, "causal", 3)
    q, k, _ = make_qkv(case)
    one = composite_estimate(q, k, None, True, 0.25, BLOCK, 4, 1)
    many = composite_estimate(q, k, None, True, 0.25, BLOCK, 4, 5)
    torch.testing.assert_close(one, many, atol=1e-7, rtol=0)


@pytest.mark.parametrize("estimator", ["composite", "pooled", "antidiagonal"])
def test_estimate_blocks_dispatches_on_config(estimator):
    case = Case(1, 2, 1, 50, 64, 8, "none", 5)
    q, k, _ = make_qkv(case)
    cfg = OmniSparseConfig(
        block_size=BLOCK, granularity=4, antidiagonal_stride=8, estimator=estimator, row_probe=False
    )
    expected = {
        "composite": lambda: composite_estimate(q, k, None, False, 0.3, BLOCK, 4, 16),
        "pooled": lambda: pooled_estimate(q, k, None, False, 0.3, BLOCK, 16),
        "antidiagonal": lambda: antidiagonal_estimate(q, k, None, False, 0.3, BLOCK, 8, 16),
    }[estimator]()
    assert torch.equal(estimate_blocks(q, k, None, False, 0.3, estimation_params(cfg)), expected)


def test_composite_sees_a_needle_that_pooling_smears_out():
    """Queries of block 3 give logit 12 to a 4-key needle in block 1 and logit 6 to their own block:
    the needle holds ~99% of the mass. Composite tokens (g = 4) keep the needle's logit; the block
    mean (g = 16) divides it by 4 (logit 3 < 6) and puts the mass on the own block instead."""
    torch.manual_seed(0)
    q = torch.randn(1, 1, 64, 16) * 0.05
    k = torch.randn(1, 1, 64, 16) * 0.05
    q[0, 0, 48:64, 0], k[0, 0, 20:24, 0] = 48**0.5, 48**0.5  # needle logit 48 * 0.25 = 12
    q[0, 0, 48:64, 1], k[0, 0, 48:64, 1] = 24**0.5, 24**0.5  # own-block logit 6
    exact = (q[0, 0, 48:64] @ k[0, 0].T * 0.25).softmax(-1).mean(0).view(4, 16).sum(-1)
    composite = composite_estimate(q, k, None, False, 0.25, BLOCK, 4, 4)[0, 0, 3]
    pooled = pooled_estimate(q, k, None, False, 0.25, BLOCK, 4)[0, 0, 3]
    assert exact[1] > 0.95
    assert (composite - exact).abs().max() < 0.02
    assert pooled[1] < 0.1 and pooled[3] > 0.9


@pytest.mark.parametrize(
    "q_shape, k_shape, mask, message",
    [
        ((1, 3, 32, 8), (1, 2, 32, 8), None, "multiple"),
        ((1, 2, 32, 8), (1, 2, 32, 8), torch.ones(31, 32, dtype=torch.bool), "broadcastable"),
        ((1, 2, 32), (1, 2, 32, 8), None, "4-D"),
    ],
)
def test_estimate_rejects_bad_inputs(q_shape, k_shape, mask, message):
    with pytest.raises(ValueError, match=message):
        estimate_blocks(
            torch.zeros(q_shape),
            torch.zeros(k_shape),
            mask,
            False,
            0.3,
            estimation_params(OmniSparseConfig(block_size=BLOCK, granularity=4)),
        )
