"""Autocast: the op casts its inputs as SDPA does, and the backend rewrites attention under autocast.

Under ``torch.autocast`` a Llama's q and k leave RoPE in fp32 while v is bf16; SDPA casts all three
to the autocast dtype. Before the op had an autocast rule, the pass saw the mixed dtypes and left
every site untouched, so a bf16 training or inference run silently used dense SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnicompile import OmniSparseConfig
from omnicompile.demos.models import build_model
from omnicompile.recording import recording
from tests.helpers import GRAD_REL_TOL, REL_TOL, rel_error

BF16 = torch.bfloat16
# Sparse mode with a selection that keeps every allowed block: must equal dense attention.
FULL_SELECTION = OmniSparseConfig(block_size=16, min_seq_len=64, tau=1.0, query_selection=False)


def _autocast():
    return torch.autocast("cpu", dtype=BF16)


def test_op_casts_mixed_inputs_like_sdpa_and_differentiates_back_to_fp32() -> None:
    q = torch.randn(1, 4, 96, 32, requires_grad=True)
    k = torch.randn(1, 2, 96, 32, requires_grad=True)
    v = torch.randn(1, 2, 96, 32).to(BF16).requires_grad_()
    with _autocast():
        out, _ = torch.ops.omnisparse.attention(
            q, k, v, None, 0.0, True, None, True, FULL_SELECTION.to_json(), "t"
        )
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert out.dtype == want.dtype == BF16
    assert rel_error(out, want) < REL_TOL[BF16]
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    wants = torch.autograd.grad(want, (q, k, v), grad)
    for g, w, t in zip(grads, wants, (q, k, v)):
        assert g.dtype == t.dtype
        assert rel_error(g, w) < GRAD_REL_TOL[BF16]


def test_compiled_llama_under_autocast_runs_the_op_and_trains() -> None:
    model = build_model("llama-tiny")
    compiled = torch.compile(model, backend="omnisparse", options=FULL_SELECTION.to_dict())
    ids = torch.randint(0, 512, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), _autocast():
        want = model(input_ids=ids).logits
        with recording() as recorder:
            got = compiled(input_ids=ids).logits
    assert [run.decision for run in recorder.runs] == ["sparse"] * model.config.num_hidden_layers
    assert got.dtype == want.dtype and rel_error(got, want) < 2 * REL_TOL[BF16]

    model.train()
    with _autocast(), recording() as recorder:
        loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    assert [run.decision for run in recorder.runs] == ["sparse"] * model.config.num_hidden_layers
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
