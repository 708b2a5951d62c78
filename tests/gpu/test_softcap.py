"""Logit soft-capping (Gemma 2, issue 19) on CUDA at Gemma 2's shapes: S = 8192, H = 8, Hkv = 4,
D = 256, bf16, causal, with and without its 4096-token sliding window; caps 50 (Gemma 2's) and 5.

- the Triton forward vs the reference ``sparse_attention`` (fp32 math) on the op's own selection (fused
  estimator and probe with the cap, fused selection), and the backward vs the reference's autograd;
- the op at tau = 1 without query selection (the sparse path over every allowed block), and in dense
  mode (a window site: the Triton kernel over its band), vs dense capped attention
  (`dense.dense_attention`'s chunked fp32 math), forward and gradients.
How to run: tests/gpu/__init__.py.
"""

from __future__ import annotations

import pytest
import torch

from omnicompile.config import OmniSparseConfig
from omnicompile.demos.structured import structured_qkv
from omnicompile.dense import dense_attention
from omnicompile.kernels.sparse_attention.reference import sparse_attention as reference_attention
from omnicompile.kernels.sparse_attention.triton_bwd import sparse_attention_backward
from omnicompile.kernels.sparse_attention.triton_fwd import sparse_attention
from omnicompile.method import AttentionInputs, plan
from omnicompile.recording import recording
from tests.gpu import ON_CUDA
from tests.helpers import GRAD_REL_TOL, REL_TOL, rel_error

pytestmark = ON_CUDA

HEADS, KV_HEADS, HEAD_DIM = 8, 4, 256
LSE_ATOL = 1e-3
CASES = [(seq, window, cap) for seq in (8192,) for window in (None, 4096) for cap in (50.0, 5.0)]
IDS = [f"S{seq}-window{window}-cap{cap:g}" for seq, window, cap in CASES]


def _qkv(seq: int, requires_grad: bool = False):
    q, k, v = structured_qkv(
        "structured", 1, HEADS, KV_HEADS, seq, HEAD_DIM, dtype=torch.bfloat16, device="cuda"
    )
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def _cotangent(out: torch.Tensor) -> torch.Tensor:
    return torch.randn(out.shape, generator=torch.Generator("cuda").manual_seed(0), device="cuda").to(
        out.dtype
    )


@pytest.mark.parametrize(("seq", "window", "cap"), CASES, ids=IDS)
def test_kernels_match_the_reference_on_the_ops_selection(seq, window, cap):
    q, k, v = _qkv(seq)
    selection = plan(AttentionInputs(q, k, None, None, True, None, window, cap), OmniSparseConfig())
    out, lse = sparse_attention(q, k, v, selection, None, True, None, window=window, softcap=cap)
    primals = tuple(t.float().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference_attention(*primals, selection, None, True, None, window=window, softcap=cap)
    assert rel_error(out, ref) < REL_TOL[torch.bfloat16]
    assert (lse - ref_lse).abs().max().item() < LSE_ATOL
    grad_out = _cotangent(out)
    grads = sparse_attention_backward(
        grad_out, q, k, v, out, lse, selection, None, True, None, window=window, softcap=cap
    )
    for got, want in zip(grads, torch.autograd.grad(ref, primals, grad_out.float())):
        assert rel_error(got, want) < GRAD_REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("mode", ["sparse_tau_1", "dense"])
@pytest.mark.parametrize(("seq", "window", "cap"), CASES, ids=IDS)
def test_op_equals_dense_capped_attention(seq, window, cap, mode):
    config = (
        OmniSparseConfig(mode="dense")
        if mode == "dense"
        else OmniSparseConfig(tau=1.0, query_selection=False, min_seq_len=1024, max_head_dim=256)
    )
    q, k, v = _qkv(seq, requires_grad=True)
    with recording(measure=False) as recorder:
        out, _ = torch.ops.omnisparse.attention(
            q, k, v, None, 0.0, True, None, True, config.to_json(), "gemma2", window, None, cap
        )
    assert recorder.runs[0].decision == ("dense" if mode == "dense" else "sparse")
    ref, _ = dense_attention(q, k, v, None, True, None, True, window, softcap=cap)
    assert rel_error(out, ref) < REL_TOL[torch.bfloat16]
    grad_out = _cotangent(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    for g, w in zip(got, torch.autograd.grad(ref, (q, k, v), grad_out)):
        assert rel_error(g, w) < GRAD_REL_TOL[torch.bfloat16]
