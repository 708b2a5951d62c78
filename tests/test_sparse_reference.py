"""Sparse attention reference: equals dense SDPA restricted to the selected blocks (fwd, lse, bwd),
invariant 4 through the pipeline, and FlexAttention on the same selection."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from omnicompile import OmniSparseConfig
from omnicompile.kernels.selection.flex import to_block_mask
from omnicompile.kernels.selection.transpose import selection_from_block_mask
from omnicompile.kernels.sparse_attention.reference import sparse_attention
from omnicompile.method import AttentionInputs, omnisparse_attention, omnisparse_attention_backward
from tests.attention_cases import Case, cases, dense_bias, make_mask, make_qkv
from tests.helpers import GRAD_REL_TOL, REL_TOL, rel_error

BLOCK = 16


def _random_selection(case: Case, density: float):
    nq, nk = -(-case.q_len // BLOCK), -(-case.kv_len // BLOCK)
    gen = torch.Generator().manual_seed(case.seed + 2)
    blocks = torch.rand(case.batch, case.heads, nq, nk, generator=gen) < density
    return selection_from_block_mask(blocks, BLOCK, case.q_len, case.kv_len)


def _token_mask(selection) -> torch.Tensor:
    """bool [B, H, Sq, Skv]: the selected blocks at token level."""
    dense = selection.dense_mask().repeat_interleave(BLOCK, 2).repeat_interleave(BLOCK, 3)
    return dense[:, :, : selection.q_len, : selection.kv_len]


@settings(max_examples=25, deadline=None)
@given(case=cases, density=st.sampled_from([0.3, 0.7, 1.0]), query_chunk=st.integers(1, 3))
def test_reference_equals_sdpa_on_the_selected_blocks(case: Case, density: float, query_chunk: int):
    """out, lse and dq/dk/dv equal SDPA with the mask restricted to the selected blocks (fp32, 1e-5);
    rows with no key: out 0, lse -inf, finite gradients."""
    q, k, v = (t.requires_grad_() for t in make_qkv(case))
    attn_mask, is_causal = make_mask(case)
    selection = _random_selection(case, density)
    out, lse = sparse_attention(q, k, v, selection, attn_mask, is_causal, None, query_chunk)
    restricted = dense_bias(attn_mask, is_causal, case.q_len, case.kv_len).masked_fill(
        ~_token_mask(selection), float("-inf")
    )
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=restricted, enable_gqa=True)
    scores = (
        q @ k.repeat_interleave(case.heads // case.kv_heads, 1).transpose(-1, -2) * case.dim**-0.5
        + restricted
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, scores.logsumexp(-1), atol=1e-5, rtol=1e-5)
    empty = torch.isneginf(lse)
    assert (out[empty] == 0).all()
    cotangent = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), cotangent)
    ref_grads = torch.autograd.grad(ref, (q, k, v), cotangent)
    for grad, ref_grad in zip(grads, ref_grads):
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["causal", "bool", "additive"])
def test_tau_one_equals_dense_sdpa(dtype: torch.dtype, mask_kind: str):
    """Invariant 4: tau = 1 without query selection is dense SDPA, forward and backward (GQA, Sq != Skv,
    partial blocks), within the per-dtype tolerance against fp32 SDPA."""
    case = Case(2, 4, 2, 75, 90, 16, mask_kind, 11)
    q, k, v = (t.requires_grad_() for t in make_qkv(case, dtype))
    attn_mask, is_causal = make_mask(case)
    cfg = OmniSparseConfig(
        tau=1.0, query_selection=False, block_size=BLOCK, granularity=4, query_chunk=2, min_seq_len=0
    )
    result = omnisparse_attention(AttentionInputs(q, k, v, attn_mask, is_causal, None), cfg)
    out, lse = result.out, result.lse
    assert out.dtype == dtype and lse.dtype == torch.float32
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(
        q32, k32, v32, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=True
    )
    assert rel_error(out, ref) < REL_TOL[dtype]
    cotangent = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), cotangent.to(dtype))
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), cotangent)
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == dtype
        assert rel_error(grad, ref_grad) < GRAD_REL_TOL[dtype]


def test_backward_by_recomputation_equals_autograd():
    """omnisparse_attention_backward (recomputed selection, torch.func.vjp) equals autograd through the op."""
    case = Case(1, 4, 2, 96, 96, 16, "causal", 4)
    q, k, v = (t.requires_grad_() for t in make_qkv(case))
    cfg = OmniSparseConfig(tau=0.8, block_size=BLOCK, granularity=4, min_seq_len=0)
    result = omnisparse_attention(AttentionInputs(q, k, v, None, True, None), cfg)
    assert result.decision.path == "sparse"
    out, lse, selection = result.out, result.lse, result.selection
    assert selection.kv_num_blocks.sum() < selection.dense_mask().numel()  # genuinely sparse
    cotangent = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v), cotangent)
    x = AttentionInputs(q.detach(), k.detach(), v.detach(), None, True, None)
    got = omnisparse_attention_backward(cotangent, x, out, lse, cfg)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("is_causal", [False, True])
def test_flex_attention_on_the_same_selection(is_causal: bool):
    """to_block_mask + flex_attention (eager on CPU) equals the reference: out and lse (fp32, 1e-5)."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    case = Case(2, 2, 2, 45, 70, 8, "causal" if is_causal else "none", 9)
    q, k, v = make_qkv(case)
    selection = _random_selection(case, 0.5)
    out, lse = sparse_attention(q, k, v, selection, None, is_causal, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "flex_attention called without torch.compile()"
        flex_out, aux = flex_attention(
            q, k, v, block_mask=to_block_mask(selection, is_causal), return_aux=AuxRequest(lse=True)
        )
    flex_lse = aux.lse
    rows = torch.isfinite(lse)
    torch.testing.assert_close(out[rows], flex_out[rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[rows], flex_lse[rows], atol=1e-5, rtol=1e-5)


def test_reference_rejects_a_mismatched_selection():
    case = Case(1, 2, 2, 40, 40, 8, "none", 0)
    q, k, v = make_qkv(case)
    selection = _random_selection(Case(1, 2, 2, 40, 50, 8, "none", 0), 1.0)
    with pytest.raises(ValueError, match="does not match"):
        sparse_attention(q, k, v, selection, None, False, None)
