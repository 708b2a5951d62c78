"""The custom op: registration checks, input validation, the dense/sparse decision and its logging."""

import logging

import pytest
import torch
import torch.nn.functional as F

from omnicompile import OmniSparseConfig
from omnicompile.method import decide
from tests.helpers import GRAD_REL_TOL, REL_TOL, rel_error

DENSE = OmniSparseConfig(mode="dense").to_json()


def _op(q, k, v, mask=None, causal=False, scale=None, gqa=True, config=DENSE, site="site0", mask_check=None):
    return torch.ops.omnisparse.attention(
        q, k, v, mask, 0.0, causal, scale, gqa, config, site, None, mask_check
    )


def _qkv(b=1, h=4, hkv=2, sq=32, skv=32, d=16, dtype=torch.float32):
    q = torch.randn(b, h, sq, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, skv, d, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hkv, skv, d, dtype=dtype, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "additive"])
def test_opcheck(mask_kind):
    q, k, v = _qkv(sq=24, skv=40)
    mask = {"bool": torch.rand(1, 1, 24, 40) > 0.3, "additive": torch.randn(1, 4, 24, 40)}.get(mask_kind)
    args = (q, k, v, mask, 0.0, mask_kind == "causal", 0.2, True, DENSE, "site0")
    torch.library.opcheck(torch.ops.omnisparse.attention.default, args)


@pytest.mark.parametrize("path", ["dense", "sparse"])
@pytest.mark.parametrize("q_layout", ["contiguous", "projection"])
def test_output_is_laid_out_as_a_models_projection(path, q_layout):
    """The output's memory order is [B, Sq, H, Dv] whatever q's strides, on the fake and the real path
    alike (opcheck), so a model's transpose of it back to [B, Sq, H * Dv] needs no copy."""
    config = DENSE if path == "dense" else OmniSparseConfig(block_size=16, min_seq_len=16).to_json()
    q, k, v = (t.detach() for t in _qkv(sq=64, skv=64))
    if q_layout == "projection":  # [B, Sq, H, D] in memory, as a model's q projection transposed
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    args = (q, k, v, None, 0.0, True, None, True, config, "site0")
    out, _ = torch.ops.omnisparse.attention(*args)
    assert out.transpose(1, 2).is_contiguous()
    if path == "dense":
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(out, expected)
    torch.library.opcheck(torch.ops.omnisparse.attention.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_mode_equals_sdpa_forward_and_backward(dtype):
    q, k, v = _qkv(sq=20, skv=36, dtype=dtype)
    mask = torch.rand(1, 1, 20, 36) > 0.2
    out, lse = _op(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert lse.shape == (1, 4, 20) and lse.dtype == torch.float32
    assert rel_error(out, ref) < REL_TOL[dtype]
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g, w in zip(got, want):
        assert rel_error(g, w) < GRAD_REL_TOL[dtype]


@pytest.mark.parametrize(
    "shapes, kwargs, match",
    [
        (((1, 4, 8), (1, 2, 8, 8), (1, 2, 8, 8)), {}, "4-D"),
        (((1, 4, 8, 16), (1, 2, 8, 8), (1, 2, 8, 8)), {}, "head dims"),
        (((1, 4, 8, 8), (1, 3, 8, 8), (1, 3, 8, 8)), {}, "KV heads"),
        (((1, 4, 8, 8), (1, 2, 8, 8), (1, 2, 8, 8)), {"gqa": False}, "enable_gqa"),
        (((1, 4, 8, 8), (1, 2, 8, 8), (1, 2, 9, 8)), {}, "disagree"),
        (((2, 4, 8, 8), (1, 2, 8, 8), (1, 2, 8, 8)), {}, "batch"),
        (
            ((1, 4, 8, 8), (1, 2, 8, 8), (1, 2, 8, 8)),
            {"mask": torch.ones(1, 1, 7, 8, dtype=torch.bool)},
            "broadcast",
        ),
        (
            ((1, 4, 8, 8), (1, 2, 8, 8), (1, 2, 8, 8)),
            {"mask": torch.ones(1, 1, 8, 8, dtype=torch.int64)},
            "bool or float",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(shapes, kwargs, match):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        _op(q, k, v, **kwargs)


def test_dropout_is_rejected():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="dropout_p"):
        torch.ops.omnisparse.attention(q, k, v, None, 0.1, False, None, True, DENSE, "s")


def test_dense_reasons():
    """`decide` reads shapes, dtypes and config only; every dense decision says why."""
    cfg = OmniSparseConfig(min_seq_len=64, block_size=16)
    q, k, v = _qkv(sq=32, skv=32)
    assert decide(q, k, v, None, cfg.replace(mode="dense")).reason == "mode='dense'"
    assert "min_seq_len" in decide(q, k, v, None, cfg).reason
    q1, k1, v1 = _qkv(sq=1, skv=128)
    assert "decode" in decide(q1, k1, v1, None, cfg).reason
    qd, kd, vd = (t.double() for t in _qkv(sq=64, skv=64))
    assert "dtype" in decide(qd, kd, vd, None, cfg).reason
    assert "window" in decide(*_qkv(sq=128, skv=128), None, cfg, window=32).reason
    assert decide(*_qkv(sq=64, skv=64), None, cfg) == decide(*_qkv(sq=64, skv=64), None, cfg, window=64)
    assert decide(*_qkv(sq=64, skv=64), None, cfg).path == "sparse"
    wide = tuple(torch.zeros(1, 2, 64, 256) for _ in range(3))  # Gemma 3's head dim
    assert decide(*wide, None, cfg).reason == "head dim 256 > max_head_dim 128"
    assert decide(*wide, None, cfg.replace(max_head_dim=256)).path == "sparse"


def test_dense_decision_logged_once_per_site(caplog):
    q, k, v = _qkv()
    cfg = OmniSparseConfig(min_seq_len=4096).to_json()
    with caplog.at_level(logging.INFO, logger="omnicompile"):
        for _ in range(3):
            _op(q, k, v, config=cfg, site="log_once_site")
        _op(q, k, v, config=cfg, site="log_once_other")
    messages = [r.getMessage() for r in caplog.records if "log_once" in r.getMessage()]
    assert len(messages) == 2 and all("min_seq_len" in m for m in messages)


SPARSE_FULL = OmniSparseConfig(tau=1.0, query_selection=False, block_size=16, granularity=4, min_seq_len=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_sparse_path_with_full_selection_equals_sdpa(dtype, causal):
    """tau = 1 and no query selection select every allowed block: the op equals SDPA, fwd and bwd."""
    q, k, v = _qkv(sq=72, skv=72, d=16, dtype=dtype)
    out, lse = _op(q, k, v, causal=causal, config=SPARSE_FULL.to_json())
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    assert torch.isfinite(lse).all()
    assert rel_error(out, ref) < REL_TOL[dtype]
    grad = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert rel_error(g, w) < GRAD_REL_TOL[dtype]


def test_sparse_path_records_stats_on_structured_input():
    from omnicompile.demos.structured import structured_qkv
    from omnicompile.recording import recording

    q, k, v = structured_qkv("structured", 1, 4, 2, 1024, 32, dtype=torch.float32, device="cpu", seed=1)
    cfg = OmniSparseConfig(block_size=16, granularity=4, min_seq_len=256).to_json()
    with recording(measure=True) as recorder:
        _, lse = _op(q, k, v, causal=True, config=cfg, site="structured_site")
    (run,) = recorder.runs
    assert run.decision == "sparse" and run.site == "structured_site"
    assert run.stats["density"] < 0.5 and run.stats["recall_mean"] > 0.9
    assert run.stats["rel_error"] < 0.1
    assert torch.isfinite(lse).all()


def test_checked_causal_mask_runs_as_is_causal():
    """transformers' bool causal mask (as under torch.compile) with its ``causal_mask_check`` takes the
    causal path: same outputs, selection and gradients as is_causal=True. Unchecked, the op applies
    the mask as given (it never scans a mask itself)."""
    from omnicompile.recording import recording

    q, k, v = _qkv(sq=96, skv=96, d=16)
    mask = torch.ones(1, 1, 96, 96, dtype=torch.bool).tril()
    cfg = OmniSparseConfig(tau=0.9, block_size=16, granularity=4, min_seq_len=64).to_json()
    check = torch.ops.omnisparse.causal_mask_check(mask)
    with recording(measure=False, keep_run=0) as masked:
        out_mask, lse_mask = _op(q, k, v, mask=mask, config=cfg, mask_check=check)
    out_causal, lse_causal = _op(q, k, v, causal=True, config=cfg)
    assert torch.equal(out_mask, out_causal) and torch.equal(lse_mask, lse_causal)
    _, _, kept_mask, kept_causal, _, _ = masked.runs[0].inputs
    assert kept_mask is None and kept_causal is True
    grads = torch.autograd.grad(out_mask, (q, k, v), torch.ones_like(out_mask))
    for g, w in zip(grads, torch.autograd.grad(out_causal, (q, k, v), torch.ones_like(out_causal))):
        assert torch.equal(g, w)
    with recording(measure=False, keep_run=0) as unchecked:
        _op(q, k, v, mask=mask, config=cfg)
    assert torch.equal(unchecked.runs[0].inputs[2], mask)  # a copy of the mask as given


@pytest.mark.interpreter
@pytest.mark.parametrize("window, q_len", [(24, 80), (16, 64), (100, 70)])
def test_window_attention_equals_sdpa_with_the_window_mask(window, q_len):
    """The dense path of a window site on CUDA: the Triton kernel over the band's blocks (here under
    the interpreter) equals SDPA with the materialised mask (b = 16, GQA, windows on and off block edges),
    its lse the log-sum-exp of the band's scores."""
    from omnicompile.kernels.masks import window_mask
    from omnicompile.method import window_attention

    torch.manual_seed(0)
    q = torch.randn(1, 4, q_len, 16, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, q_len, 16, dtype=torch.bfloat16) for _ in range(2))
    out, lse = window_attention(q, k, v, None, window, 16)
    mask = window_mask(q_len, q_len, window, q.device)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    assert rel_error(out, ref) < REL_TOL[torch.bfloat16]
    scores = q.float() @ k.float().repeat_interleave(2, 1).transpose(-1, -2) / 4  # scale 1 / sqrt(16)
    want = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(lse, want, atol=1e-3, rtol=1e-3)


def test_nearly_dense_heads_run_exact_attention_without_a_dense_decision():
    """Random (flat) inputs select nearly every block: each such head takes every allowed block inside the
    selection, so the call stays on the sparse path (no per-call density read) and equals SDPA."""
    from omnicompile.recording import recording

    torch.manual_seed(0)
    q, k, v = _qkv(sq=256, skv=256, d=16)
    cfg = OmniSparseConfig(tau=0.9, block_size=16, granularity=4, min_seq_len=64)
    with recording(measure=True) as recorder:
        out, _ = _op(q, k, v, causal=True, config=cfg.to_json())
        _op(q, k, v, causal=True, config=cfg.replace(dense_fallback_density=1.0).to_json())
    full, sparse = recorder.runs
    assert full.decision == "sparse" and full.stats["dense_heads"] == 1.0 and full.stats["density"] == 1.0
    assert sparse.stats["dense_heads"] < 1.0 and 0.9 < sparse.stats["density"] < 1.0
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert rel_error(out, ref) < REL_TOL[torch.float32]


@pytest.mark.parametrize("mask_kind", ["causal", "bool"])
def test_each_op_call_checks_its_inputs_once(monkeypatch, mask_kind):
    """One forward op call (sparse path) runs `masks.check_qkv` and `masks.validate_mask` once each (the
    op's `AttentionInputs` and `masks.allowed_blocks`), wherever they are imported; so does its backward."""
    import sys

    from omnicompile.kernels import masks

    calls = []
    for name in ("check_qkv", "validate_mask"):
        original = getattr(masks, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        for module in list(sys.modules.values()):
            if (
                getattr(module, "__name__", "").startswith("omnicompile")
                and getattr(module, name, None) is original
            ):
                monkeypatch.setattr(module, name, counted)
    q, k, v = _qkv(sq=96, skv=96, d=16)
    mask = (
        torch.rand(1, 1, 96, 96, generator=torch.Generator().manual_seed(3)) > 0.2
        if mask_kind == "bool"
        else None
    )
    cfg = OmniSparseConfig(tau=0.9, block_size=16, granularity=4, min_seq_len=64).to_json()
    out, _ = _op(q, k, v, mask=mask, causal=mask is None, config=cfg)
    assert sorted(calls) == ["check_qkv", "validate_mask"]
    calls.clear()
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert sorted(calls) == ["check_qkv", "validate_mask"]
