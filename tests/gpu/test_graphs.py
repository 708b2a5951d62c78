"""The prefill op on CUDA has no host synchronisation: it runs under ``set_sync_debug_mode("error")``,
is captured and replayed in a CUDA graph (new inputs, a new selection, equal to eager), and a model
compiled with ``mode="reduce-overhead"`` runs its sparse sites from CUDA graphs. How to run:
tests/gpu/__init__.py."""

from __future__ import annotations

import torch

import omnicompile
from omnicompile import OmniSparseConfig
from omnicompile.demos.models import build_model
from omnicompile.demos.structured import structured_qkv
from omnicompile.recording import recording
from tests.gpu import ON_CUDA
from tests.helpers import cuda_graph, rel_error

pytestmark = ON_CUDA

CONFIG = OmniSparseConfig(min_seq_len=1024)
SEQ, HEADS, KV_HEADS, DIM = 4096, 8, 2, 64


def _op(q, k, v, config: OmniSparseConfig = CONFIG):
    return torch.ops.omnisparse.attention(
        q, k, v, None, 0.0, True, None, True, config.to_json(), "gpu_site", None, None
    )


def _inputs(preset: str, seed: int):
    return structured_qkv(
        preset, 1, HEADS, KV_HEADS, SEQ, DIM, dtype=torch.bfloat16, device="cuda", seed=seed
    )


def test_op_runs_without_host_synchronisation():
    q, k, v = _inputs("mixed", 0)
    _op(q, k, v)  # compiles the kernels (compilation may synchronise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, lse = _op(q, k, v)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_op_replays_in_a_cuda_graph_with_new_inputs():
    """Captured on structured input, replayed on it and on flat input (whose heads are all dense by the
    device-side rule): each replay equals the eager op on the same input."""
    structured, flat = _inputs("structured", 1), _inputs("random", 2)
    static = [t.clone() for t in structured]
    graph, (static_out, static_lse) = cuda_graph(lambda: _op(*static))
    with recording(measure=True) as recorder:
        for inputs in (structured, flat, structured):
            for buffer, value in zip(static, inputs):
                buffer.copy_(value)
            graph.replay()
            want_out, want_lse = _op(*inputs)
            assert rel_error(static_out, want_out) < 1e-3
            assert torch.allclose(static_lse, want_lse, atol=1e-3, rtol=0)
    dense_heads = [run.stats["dense_heads"] for run in recorder.runs]
    assert dense_heads[1] > dense_heads[0]  # flat input: more dense heads, decided inside the graph


def test_reduce_overhead_compiles_a_model_with_sparse_sites():
    from torch._dynamo.utils import counters

    model = build_model("llama-tiny", dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, model.config.vocab_size, (1, 2048), device="cuda")
    config = OmniSparseConfig(min_seq_len=1024, tau=0.8)
    torch._dynamo.reset()
    counters.clear()
    graphed = torch.compile(model, backend=omnicompile.backend(config), mode="reduce-overhead")
    with torch.no_grad():
        with recording(measure=False) as recorder:
            graphed(ids)
        outs = [graphed(ids).logits.clone() for _ in range(3)]
        torch._dynamo.reset()
        plain = torch.compile(model, backend=omnicompile.backend(config))(ids).logits
    assert [run.decision for run in recorder.runs] == ["sparse", "sparse"]
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    for out in outs:
        assert rel_error(out, plain) < 2e-2
