"""A chunk against a cached prefix and packed sequences through the op (omnicompile.varlen, issue 20).

`prefix_causal_attention` (bottom-right causal, split at the chunk and merged by lse) equals dense SDPA
with the bottom-right mask in dense mode and at tau = 1 (every allowed block), with and without GQA
and soft-capping, and its gradients (the masked path autograd takes) equal SDPA's; at tau < 1 on
structured heads a prefill in chunks stays as close to dense as the one-shot sparse prefill.
`varlen_attention` equals each sequence run alone and dense attention under `varlen_mask`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from omnicompile import OmniSparseConfig
from omnicompile.demos.structured import structured_qkv
from omnicompile.recording import recording
from omnicompile.varlen import (
    bottom_right_causal_mask,
    prefix_causal_attention,
    varlen_attention,
    varlen_mask,
)
from tests.helpers import GRAD_REL_TOL, REL_TOL, rel_error

DENSE = OmniSparseConfig(mode="dense")
EXACT = OmniSparseConfig(tau=1.0, query_selection=False, block_size=16, granularity=4, min_seq_len=16)
MODES = {"dense": DENSE, "exact": EXACT}
SCALE = 0.3


def _qkv(seed: int, q_len: int, kv_len: int, heads: int = 4, kv_heads: int = 2, dim: int = 16):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, q_len, dim, generator=gen)
    k, v = (torch.randn(1, kv_heads, kv_len, dim, generator=gen) for _ in range(2))
    return q, k, v


def _sdpa(q, k, v, keep, softcap=None):
    """fp64 attention with the bool mask ``keep`` (soft-capped scores when ``softcap``), in q's dtype."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, 1) for t in (k, v))
    scores = SCALE * q.double() @ k.transpose(-1, -2)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    return (scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v).to(q.dtype)


@settings(max_examples=10, deadline=None)
@given(
    chunk=st.integers(1, 70),
    prefix=st.integers(0, 90),
    mode=st.sampled_from(sorted(MODES)),
    softcap=st.sampled_from([None, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_chunk_after_a_prefix_equals_bottom_right_masked_sdpa(chunk, prefix, mode, softcap, seed) -> None:
    q, k, v = _qkv(seed, chunk, prefix + chunk)
    with recording(measure=False) as recorder:
        out = prefix_causal_attention(q, k, v, MODES[mode], SCALE, softcap)
    want = _sdpa(q, k, v, bottom_right_causal_mask(chunk, prefix + chunk), softcap)
    assert rel_error(out, want) <= REL_TOL[torch.float32]
    if mode == "exact" and chunk >= 16 and prefix >= 16:  # both parts long enough to run sparse
        assert [run.decision for run in recorder.runs] == ["sparse", "sparse"]
        assert [run.site for run in recorder.runs] == ["chunk.prefix", "chunk.chunk"]


def test_min_seq_len_is_read_against_the_chunk_s_whole_key_length() -> None:
    """A chunk of 32 queries after 64 cached keys, min_seq_len 96 (= S): the prefix part runs sparse
    as a one-shot prefill of 96 tokens would; the chunk's own 32-key causal part runs dense. With S
    below min_seq_len both run dense."""
    q, k, v = _qkv(5, 32, 96)
    for min_seq_len, want in ((96, ["sparse", "dense"]), (97, ["dense", "dense"])):
        config = dataclasses.replace(EXACT, min_seq_len=min_seq_len)
        with recording(measure=False) as recorder:
            out = prefix_causal_attention(q, k, v, config, SCALE)
        assert [run.decision for run in recorder.runs] == want
        assert rel_error(out, _sdpa(q, k, v, bottom_right_causal_mask(32, 96))) <= REL_TOL[torch.float32]


def test_bottom_right_mask_is_causal_shifted_to_the_last_keys() -> None:
    mask = bottom_right_causal_mask(3, 5)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert torch.equal(bottom_right_causal_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).tril())


@pytest.mark.parametrize("mode", sorted(MODES))
def test_chunk_gradients_equal_sdpa(mode: str) -> None:
    q, k, v = _qkv(5, 40, 72)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = prefix_causal_attention(q, k, v, MODES[mode], SCALE)
    grad = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(_sdpa(q, k, v, bottom_right_causal_mask(40, 72)), (q, k, v), grad)
    for g, w in zip(got, want):
        assert rel_error(g, w) <= GRAD_REL_TOL[torch.float32]


def test_chunked_prefill_stays_as_close_to_dense_as_one_shot() -> None:
    """Structured heads of differing breadth, 512 tokens in 4 chunks of 128, tau 0.9: each chunk's
    selection (per part) keeps at least the one-shot prefill's accuracy, within a small margin."""
    config = OmniSparseConfig(block_size=16, granularity=4, min_seq_len=64, tau=0.9)
    q, k, v = structured_qkv(
        "mixed",
        1,
        4,
        2,
        512,
        32,
        window=16,
        slash_period=128,
        stripes=4,
        stripe_width=8,
        needles=2,
        needle_len=16,
    )
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    one_shot = torch.ops.omnisparse.attention(
        q, k, v, None, 0.0, True, None, True, config.to_json(), "one_shot", need_lse=False
    )[0]
    with recording(measure=False) as recorder:
        chunks = [
            prefix_causal_attention(
                q[:, :, start : start + 128], k[:, :, : start + 128], v[:, :, : start + 128], config
            )
            for start in range(0, 512, 128)
        ]
    assert {run.decision for run in recorder.runs} == {"sparse"} and len(recorder.runs) == 7
    chunked = torch.cat(chunks, 2)
    one_shot_error, chunked_error = rel_error(one_shot, dense), rel_error(chunked, dense)
    assert one_shot_error > 1e-4  # the selection is sparse: the check below means something
    assert chunked_error <= 1.25 * one_shot_error + 1e-3


def test_more_queries_than_keys_is_an_error() -> None:
    q, k, v = _qkv(0, 8, 4)
    with pytest.raises(ValueError, match="needs n <= S"):
        prefix_causal_attention(q, k, v, DENSE)


def _packed(seed: int, q_lens: list[int], kv_lens: list[int], heads=4, kv_heads=2, dim=16):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), heads, dim, generator=gen)
    k, v = (torch.randn(sum(kv_lens), kv_heads, dim, generator=gen) for _ in range(2))
    cu = [torch.tensor([0, *lens]).cumsum(0) for lens in (q_lens, kv_lens)]
    return q, k, v, cu[0], cu[1]


@settings(max_examples=8, deadline=None)
@given(
    seqs=st.lists(st.tuples(st.integers(0, 50), st.integers(0, 40)), min_size=1, max_size=4),
    causal=st.booleans(),
    mode=st.sampled_from(sorted(MODES)),
)
def test_varlen_equals_each_sequence_alone_and_masked_dense(seqs, causal, mode) -> None:
    """Sequence j: q_len n_j, kv_len n_j + p_j (a chunk after a p_j-token prefix), or none at all."""
    q_lens, kv_lens = [n for n, _ in seqs], [n + p if n else 0 for n, p in seqs]
    q, k, v, cu_q, cu_k = _packed(1, q_lens, kv_lens)
    out = varlen_attention(q, k, v, cu_q, cu_k, MODES[mode], causal, SCALE)
    assert out.shape == (q.shape[0], 4, 16)
    keep = varlen_mask(cu_q, cu_k, causal)
    rows = keep.any(-1)
    hq, hk, hv = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    want = _sdpa(hq, hk, hv, keep)[0].transpose(0, 1)
    assert rel_error(out[rows], want[rows]) <= REL_TOL[torch.float32]
    for j, (q0, q1, k0, k1) in enumerate(zip(cu_q, cu_q[1:], cu_k, cu_k[1:])):
        if q1 > q0:
            alone = varlen_attention(
                q[q0:q1],
                k[k0:k1],
                v[k0:k1],
                cu_q[j : j + 2] - q0,
                cu_k[j : j + 2] - k0,
                MODES[mode],
                causal,
                SCALE,
            )
            assert torch.equal(out[q0:q1], alone)


def test_varlen_rejects_malformed_boundaries() -> None:
    q, k, v, cu_q, cu_k = _packed(0, [3, 4], [3, 4])
    with pytest.raises(ValueError, match="rise from 0"):
        varlen_attention(q, k, v, torch.tensor([0, 4, 3]), cu_k, DENSE)
    with pytest.raises(ValueError, match="1-D integer"):
        varlen_attention(q, k, v, cu_q.float(), cu_k, DENSE)
    with pytest.raises(ValueError, match="sequences"):
        varlen_attention(q, k, v, cu_q, torch.tensor([0, 7]), DENSE)
    with pytest.raises(ValueError, match="no key"):
        varlen_attention(q, k, v, cu_q, torch.tensor([0, 0, 7]), DENSE)
