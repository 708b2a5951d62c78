"""Logit soft-capping (Gemma 2, issue 19) against exact capped math in float64: the sparse reference,
the dense chunked path, the exact block mass and the row probe; the op's validation, registration,
autograd and recording; tau = 1 equal to dense capped attention. CPU, no Triton (the kernels are
checked against these references in tests/test_triton_*.py)."""

from __future__ import annotations

import math

import pytest
import torch

from omnicompile import dense
from omnicompile.config import OmniSparseConfig
from omnicompile.kernels.estimation.reference import composite_estimate, probe_block_mass
from omnicompile.kernels.masks import allowed_blocks, window_mask
from omnicompile.kernels.selection.transpose import selection_from_block_mask
from omnicompile.kernels.softcap import check_softcap
from omnicompile.kernels.sparse_attention.reference import sparse_attention
from omnicompile.metrics import exact_block_mass
from omnicompile.recording import recording
from tests.helpers import GRAD_REL_TOL, REL_TOL, rel_error

CAP = 2.0
SCALE = 0.5  # scores of unit Gaussians at D = 16 spread over about +-8: the cap of 2 saturates
BLOCK = 16
MASKINGS = ("none", "causal", "window", "bool", "additive")
DENSE = OmniSparseConfig(mode="dense").to_json()
# Sparse on the CPU reference from 32 keys on; tau = 1 without query selection takes every allowed block.
EXACT_SPARSE = OmniSparseConfig(
    tau=1.0, query_selection=False, block_size=BLOCK, granularity=4, min_seq_len=32
).to_json()


def _case(masking: str, q_len: int = 40, kv_len: int = 50, window_size: int = 12, seed: int = 0):
    """(q [2, 4, Sq, 16], k, v [2, 2, Skv, 16], attn_mask, is_causal, window) for the masking; masks
    hold fully masked rows."""
    gen = torch.Generator().manual_seed(seed + MASKINGS.index(masking))
    q = torch.randn(2, 4, q_len, 16, generator=gen)
    k = torch.randn(2, 2, kv_len, 16, generator=gen)
    v = torch.randn(2, 2, kv_len, 16, generator=gen)
    keep = torch.rand(2, 1, q_len, kv_len, generator=gen) < 0.7
    keep[:, :, 3] = False
    mask = {
        "bool": keep,
        "additive": torch.randn(1, 4, q_len, kv_len, generator=gen).masked_fill(~keep, -math.inf),
    }
    causal, window = masking in ("causal", "window"), window_size if masking == "window" else None
    return q, k, v, mask.get(masking), causal, window


def capped_math(q, k, v, attn_mask, is_causal, scale, softcap, window=None):
    """(out, lse) in float64, transformers' eager Gemma 2 order: scale, cap, mask, softmax; fully masked
    rows: out 0, lse -inf."""
    if window is not None:
        attn_mask, is_causal = window_mask(q.shape[2], k.shape[2], window, q.device), False
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, 1) for t in (k, v))
    scores = q.double() @ k.mT * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), -math.inf)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, -math.inf)
    elif attn_mask is not None:
        scores = scores + attn_mask.double()
    seen = torch.isfinite(scores.detach().amax(-1, keepdim=True))  # rows with a key
    scores = torch.where(seen, scores, 0.0)  # the others: no NaN, in the gradients either
    lse = torch.where(seen, scores.logsumexp(-1, keepdim=True), -math.inf)
    return torch.where(seen, scores.softmax(-1), 0.0) @ v, lse.squeeze(-1)


def _grads(out: torch.Tensor, primals, seed: int = 5):
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad(out, primals, cotangent)


def _check_against_math(out, lse, primals, *case, softcap, tol=1e-5):
    """``out`` (and ``lse`` unless None) and the gradients through ``out`` equal `capped_math`'s."""
    q, k, v, mask, causal, window = case
    math_primals = tuple(t.detach().double().requires_grad_() for t in (q, k, v))
    want, want_lse = capped_math(*math_primals, mask, causal, SCALE, softcap, window)
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    if lse is not None:
        seen = torch.isfinite(want_lse)
        assert torch.equal(torch.isfinite(lse), seen)
        torch.testing.assert_close(lse.double()[seen], want_lse[seen], atol=tol, rtol=tol)
    for got, expected in zip(_grads(out, primals), _grads(want, math_primals)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), expected, atol=10 * tol, rtol=10 * tol)


@pytest.mark.parametrize("value", [0, 0.0, -1.0, math.inf, math.nan, True, "50"])
def test_invalid_softcap_is_a_value_error(value):
    with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
        check_softcap(value)
    q, k, v, *_ = _case("none")
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # the schema takes floats only
        with pytest.raises(ValueError, match="softcap"):
            torch.ops.omnisparse.attention(
                q, k, v, None, 0.0, False, None, True, DENSE, "s", None, None, value
            )


@pytest.mark.parametrize("softcap", [None, CAP])
@pytest.mark.parametrize("masking", MASKINGS)
def test_sparse_reference_with_every_block_equals_capped_math(masking, softcap):
    q, k, v, mask, causal, window = case = _case(masking)
    primals = tuple(t.requires_grad_() for t in (q, k, v))
    nq, nk = -(-q.shape[2] // BLOCK), -(-k.shape[2] // BLOCK)
    every_block = selection_from_block_mask(
        torch.ones(2, 4, nq, nk, dtype=torch.bool), BLOCK, q.shape[2], k.shape[2]
    )
    out, lse = sparse_attention(*primals, every_block, mask, causal, SCALE, 2, window=window, softcap=softcap)
    _check_against_math(out, lse, primals, *case, softcap=softcap)


@pytest.mark.parametrize("masking", MASKINGS)
def test_dense_capped_attention_equals_capped_math(masking, monkeypatch):
    """Query chunks of 3 rows (the chunk budget made small); Sq != Skv."""
    monkeypatch.setattr(dense, "_SCORE_CHUNK_ELEMENTS", 3 * 2 * 4 * 50)
    q, k, v, mask, causal, window = case = _case(masking)
    primals = tuple(t.requires_grad_() for t in (q, k, v))
    out, lse = dense.dense_attention(*primals, mask, causal, SCALE, True, window, softcap=CAP)
    assert out.dtype == q.dtype and out.is_contiguous()
    _check_against_math(out, lse, primals, *case, softcap=CAP)


@pytest.mark.parametrize("masking", MASKINGS)
def test_exact_block_mass_and_probe_are_the_capped_masses(masking):
    """The composite estimate at granularity 1 and the row probe are exact with a cap: the capped
    attention mass per key block (of the query block's attending rows, averaged; of its last row)."""
    q, k, _, mask, causal, window = _case(masking, q_len=64, kv_len=64)
    if window is not None:  # the estimators take the window as such; the math takes its mask
        mask, causal = None, True
    probs = _capped_probs(q, k, mask, causal, window)
    per_block = probs.unflatten(-1, (4, BLOCK)).sum(-1)  # [B, H, Sq, nk]
    rows_seen = (probs.sum(-1) > 0).unflatten(-1, (4, BLOCK))
    mean = per_block.unflatten(2, (4, BLOCK)).sum(3) / rows_seen.sum(-1, keepdim=True).clamp_min(1)
    mass = exact_block_mass(q, k, mask, causal, SCALE, BLOCK, softcap=CAP) if window is None else None
    if mass is not None:
        torch.testing.assert_close(mass.double(), mean, atol=1e-5, rtol=1e-5)
    probe = probe_block_mass(q, k, mask, causal, SCALE, BLOCK, window=window, softcap=CAP)
    torch.testing.assert_close(probe.double(), per_block[:, :, BLOCK - 1 :: BLOCK], atol=1e-5, rtol=1e-5)


def _capped_probs(q, k, mask, causal, window):
    """float64 [B, H, Sq, Skv] capped attention probabilities (`capped_math`'s)."""
    eye = torch.eye(k.shape[2], dtype=k.dtype).expand(*k.shape[:2], -1, -1)  # v = I: out is the probs
    out, _ = capped_math(q, k, eye, mask, causal, SCALE, CAP, window)
    return out


@pytest.mark.parametrize("masking", MASKINGS)
def test_capped_composite_estimate_is_a_distribution_over_allowed_blocks(masking):
    """At granularity 4 the cap acts on composite scores (an approximation): still invariant 1."""
    q, k, _, mask, causal, window = _case(masking, q_len=64, kv_len=80)
    ahat = composite_estimate(q, k, mask, causal, SCALE, BLOCK, 4, 2, window=window, softcap=CAP)
    allowed = allowed_blocks(mask, causal, 2, 4, 64, 80, BLOCK, "cpu", window=window).expand_as(ahat)
    assert (ahat >= 0).all() and (ahat[~allowed] == 0).all()
    sums = ahat.sum(-1)
    torch.testing.assert_close(sums[allowed.any(-1)], torch.ones(()).expand(int(allowed.any(-1).sum())))


@pytest.mark.parametrize("masking", ["none", "causal", "bool", "additive"])
def test_opcheck_with_softcap(masking):
    q, k, v, mask, causal, _ = _case(masking, q_len=24, kv_len=40)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    args = (q, k, v, mask, 0.0, causal, SCALE, True, DENSE, "site0", None, None, CAP)
    torch.library.opcheck(torch.ops.omnisparse.attention.default, args)


@pytest.mark.parametrize("config", [DENSE, EXACT_SPARSE], ids=["dense", "sparse_tau_1"])
@pytest.mark.parametrize("masking", MASKINGS)
def test_op_forward_and_backward_equal_capped_math(masking, config):
    """Dense mode and tau = 1 without query selection (the sparse path over every allowed block)
    equal exact capped attention, forward and gradients, fp32; the run records its cap (a window of
    36 >= min_seq_len: sparse)."""
    q, k, v, mask, causal, window = case = _case(masking, q_len=48, kv_len=48, window_size=36)
    primals = tuple(t.requires_grad_() for t in (q, k, v))
    with recording(measure=True, keep_run=0) as recorder:
        out, lse = torch.ops.omnisparse.attention(
            *primals, mask, 0.0, causal, SCALE, True, config, "site0", window, None, CAP
        )
    (run,) = recorder.runs
    assert run.decision == ("dense" if config == DENSE else "sparse")
    assert run.inputs[5] == CAP
    if config != DENSE:
        assert run.stats["rel_error"] < 1e-5 and run.stats["recall_mean"] > 1 - 1e-5
    _check_against_math(out, lse if config != DENSE else None, primals, *case, softcap=CAP, tol=2e-5)


def test_autocast_keeps_the_softcap():
    q, k, v, *_ = _case("causal")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = torch.ops.omnisparse.attention(
            q, k, v, None, 0.0, True, SCALE, True, DENSE, "s", None, None, CAP
        )
    want, _ = capped_math(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, True, SCALE, CAP)
    assert out.dtype == torch.bfloat16
    assert rel_error(out, want) < REL_TOL[torch.bfloat16]


def test_bf16_op_gradients_within_tolerance():
    q, k, v, mask, causal, window = _case("additive")
    primals = tuple(t.bfloat16().requires_grad_() for t in (q, k, v))
    out, _ = torch.ops.omnisparse.attention(
        *primals, mask, 0.0, causal, SCALE, True, DENSE, "s", window, None, CAP
    )
    math_primals = tuple(t.detach().double().requires_grad_() for t in primals)
    want, _ = capped_math(*math_primals, mask, causal, SCALE, CAP)
    assert rel_error(out, want) < REL_TOL[torch.bfloat16]
    for got, expected in zip(_grads(out, primals), _grads(want, math_primals)):
        assert rel_error(got, expected) < GRAD_REL_TOL[torch.bfloat16]
