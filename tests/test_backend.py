"""The backend end to end: registration, options, dense-mode equality (fwd and bwd), explain, HF models."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import omnicompile
from omnicompile import OmniSparseConfig
from omnicompile.demos.models import build_model
from tests.helpers import GRAD_REL_TOL, REL_TOL, rel_error

DENSE = OmniSparseConfig(mode="dense")


@st.composite
def attention_cases(draw):
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    return dict(
        batch=draw(st.integers(1, 2)),
        heads=kv_heads * draw(st.sampled_from([1, 2])),
        kv_heads=kv_heads,
        q_len=draw(st.integers(1, 40)),
        kv_len=draw(st.integers(1, 40)),
        head_dim=draw(st.sampled_from([32, 64, 128])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        mask=draw(st.sampled_from(["none", "causal", "bool", "additive"])),
    )


def _inputs(case):
    shape_q = (case["batch"], case["heads"], case["q_len"], case["head_dim"])
    shape_kv = (case["batch"], case["kv_heads"], case["kv_len"], case["head_dim"])
    q = torch.randn(shape_q, dtype=case["dtype"], requires_grad=True)
    k = torch.randn(shape_kv, dtype=case["dtype"], requires_grad=True)
    v = torch.randn(shape_kv, dtype=case["dtype"], requires_grad=True)
    mask_shape = (case["batch"], 1, case["q_len"], case["kv_len"])
    mask = {
        "bool": torch.rand(mask_shape) > 0.3,
        "additive": torch.randn(mask_shape, dtype=case["dtype"]),
    }.get(case["mask"])
    return q, k, v, mask


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=attention_cases())
def test_dense_mode_equals_eager_sdpa_forward_and_backward(case):
    q, k, v, mask = _inputs(case)
    causal = case["mask"] == "causal"

    def attention(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True) * 2

    torch._dynamo.reset()
    reports = []
    compiled = torch.compile(attention, backend=omnicompile.backend(DENSE, reports=reports), dynamic=False)
    out, ref = compiled(q, k, v, mask), attention(q, k, v, mask)
    assert [s.status for r in reports for s in r.sites] == ["replaced"]
    assert rel_error(out, ref) < REL_TOL[case["dtype"]]
    grad = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert rel_error(g, w) < GRAD_REL_TOL[case["dtype"]]


def test_registered_backend_takes_options_and_rejects_unknown_ones():
    q = torch.randn(1, 2, 16, 32)

    def attention(q):
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)

    torch._dynamo.reset()
    out = torch.compile(attention, backend="omnisparse", options={"mode": "dense"})(q)
    torch.testing.assert_close(out, attention(q))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="taux"):
        torch.compile(attention, backend="omnisparse", options={"taux": 0.5})(q)


def test_entry_point_works_without_import():
    code = (
        "import torch, sys\n"
        "f = torch.compile(lambda q: torch.nn.functional.scaled_dot_product_attention(q, q, q),"
        " backend='omnisparse', fullgraph=True)\n"
        "q = torch.randn(1, 2, 8, 16)\n"
        "assert torch.allclose(f(q), torch.nn.functional.scaled_dot_product_attention(q, q, q), atol=1e-5)\n"
        "assert 'omnicompile' in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


@pytest.mark.parametrize("name", ["llama-tiny", "qwen2-tiny"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_models_every_layer_found_and_dense_logits_match(name, impl):
    model = build_model(name, attn_implementation=impl)
    ids = torch.randint(0, model.config.vocab_size, (1, 96))
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(ids).logits
        report = omnicompile.explain(model, ids, config=DENSE)
    sites = [s for s in report.sites if s.decision != "untouched"]
    assert len(sites) == model.config.num_hidden_layers
    assert all(s.decision == "dense" and s.reason == "mode='dense'" and s.gqa for s in sites)
    assert "site" in str(report) and sites[0].node in str(report)
    torch.testing.assert_close(report.output.logits, eager, atol=1e-4, rtol=1e-4)


def test_llama_sparse_mode_reports_density_and_recall_per_layer():
    """Sparse mode on CPU runs the reference; with tau = 1 and no query selection it selects every
    allowed block, so the logits equal eager's; with the defaults it reports its sparsity."""
    model = build_model("llama-tiny")
    ids = torch.randint(0, model.config.vocab_size, (1, 256))
    base = OmniSparseConfig(block_size=16, granularity=4, min_seq_len=128)
    with torch.no_grad():
        eager = model(ids).logits
        torch._dynamo.reset()
        full = omnicompile.explain(model, ids, config=base.replace(tau=1.0, query_selection=False))
        torch._dynamo.reset()
        sparse = omnicompile.explain(model, ids, config=base)
    torch.testing.assert_close(full.output.logits, eager, atol=1e-4, rtol=1e-4)
    for report in (full, sparse):
        assert len(report.sites) == 2 and all(s.decision == "sparse" for s in report.sites)
        for site in report.sites:
            assert (
                0 < site.stats["density"] <= 1
                and 0 < site.stats["recall_min"] <= site.stats["recall_mean"] <= 1
            )
    assert all(s.stats["density"] == 1.0 and s.stats["recall_min"] > 0.999 for s in full.sites)
    assert all(s.stats["recall_mean"] >= 0.95 for s in sparse.sites)


def test_short_sequence_runs_dense_with_reason():
    model = build_model("llama-tiny")
    ids = torch.randint(0, model.config.vocab_size, (1, 64))
    torch._dynamo.reset()
    with torch.no_grad():
        report = omnicompile.explain(model, ids)
    assert all(s.decision == "dense" and "min_seq_len" in s.reason for s in report.sites)


def test_untouched_sites_are_summarised_in_one_warning(caplog):
    """One warning per compiled graph says how many attention sites were rewritten."""

    def fn(q, k, v):
        kept = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        dropped = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)  # dropout: left untouched
        return kept, dropped

    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    torch._dynamo.reset()
    with caplog.at_level("WARNING", logger="omnicompile"):
        torch.compile(fn, backend=omnicompile.backend(DENSE))(q, k, v)
    summaries = [r.getMessage() for r in caplog.records if "attention sites rewritten" in r.getMessage()]
    assert len(summaries) == 1 and summaries[0].startswith("omnisparse: 1 of 2 attention sites rewritten")
