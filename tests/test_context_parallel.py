"""Sparse attention under context parallelism (`omnicompile.context_parallel`, issue 21), on the CPU.

Multi-process: W = 2 and W = 4 gloo processes (tests/context_parallel_worker.py, started once per W by
a module fixture) run PyTorch's ring with the op at every step on the load-balanced (head-tail) shards,
forward and backward, and save the unsharded outputs and gradients; the tests compare them with
single-process references:
- exact config (tau = 1, no query selection) causal: dense SDPA and the single-process op, output, lse
  and gradients; W = 2: ``mode="dense"`` non-causal (contiguous shards): dense SDPA;
- sparse config (tau = 0.9) on structured inputs: the per-shard selection legitimately differs from the
  single-process one (each step selects against the keys it visits, reaching tau of that step's own
  mass), so the reference is a single-process emulation of the same per-step calls (PyTorch's
  schedule: own shard causal, earlier ranks' first chunk, later ranks' shards from the second half of
  the queries) with the method's selection and the differentiable reference, merged by
  `merge_attention`, gradients by autograd through the merge (independent of the op's backward and
  of PyTorch's backward ring);
- W = 2 only: ``torch.compile`` with `context_parallel.backend` (Inductor) equals the eager ring, and a
  tiny Llama with ``attn_implementation="omnisparse_cp"`` (eager, and compiled with ``aot_eager``)
  equals the single-process SDPA model, logits and embedding gradients.
Single-process: the backward op given a merged (out, lse) returns the part's exact share of the
gradients; the step config; the graph rewrite's refusals.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from omnicompile import OmniSparseConfig, merge_attention
from omnicompile import context_parallel as cp
from omnicompile.kernels.masks import allowed_blocks
from omnicompile.kernels.sparse_attention import sparse_attention
from omnicompile.method import AttentionInputs, plan
from tests.helpers import GRAD_REL_TOL, REL_TOL, SMALL_LM, rel_error

WORKER = Path(__file__).with_name("context_parallel_worker.py")
RING_SCENARIOS = ["exact_causal", "sparse_causal"]
SCENARIOS = {2: RING_SCENARIOS + ["dense_full", "compiled", "hf", "hf_compiled"], 4: RING_SCENARIOS}
BLOCK = 16
EXACT = OmniSparseConfig(tau=1.0, query_selection=False, block_size=BLOCK, granularity=4, min_seq_len=0)
SPARSE = OmniSparseConfig(tau=0.9, block_size=BLOCK, granularity=4, min_seq_len=0)
TOL = REL_TOL[torch.float32]
GRAD_TOL = GRAD_REL_TOL[torch.float32]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(world: int, out: Path) -> Path:
    """Run the worker on ``world`` processes; fail with the first failing rank's output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [str(out), *SCENARIOS[world]]
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), str(world), port, *command],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail(f"context-parallel worker (W={world}) timed out")
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        if proc.returncode:
            pytest.fail(f"context-parallel worker rank {rank}/{world} failed:\n{output[-6000:]}")
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """{W: folder of the scenario results}, each W run once (lazily)."""
    done: dict[int, Path] = {}

    def results(world: int, scenario: str) -> dict:
        if world not in done:
            done[world] = _launch(world, tmp_path_factory.mktemp(f"cp{world}"))
        return torch.load(done[world] / f"{scenario}.pt")

    return results


def _check(got: dict, want: dict, names=("out", "dq", "dk", "dv")) -> None:
    for name in names:
        tol = TOL if name in ("out", "lse") else GRAD_TOL
        assert got[name].shape == want[name].shape, name
        assert rel_error(got[name], want[name]) <= tol, (name, rel_error(got[name], want[name]))


def _sdpa(q, k, v, grad_out, causal) -> dict:
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    out.backward(grad_out)
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _single_process_op(q, k, v, grad_out, config) -> dict:
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = torch.ops.omnisparse.attention(q, k, v, None, 0.0, True, None, True, config.to_json(), "one")
    out.backward(grad_out)
    return {"out": out.detach(), "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}


@pytest.mark.parametrize("world", [2, 4])
def test_exact_ring_equals_dense_sdpa_and_the_single_process_op(ranks, world):
    got = ranks(world, "exact_causal")
    q, k, v, grad_out = got["inputs"]
    _check(got, _sdpa(q, k, v, grad_out, causal=True))
    _check(got, _single_process_op(q, k, v, grad_out, EXACT), ("out", "lse", "dq", "dk", "dv"))


def test_dense_mode_non_causal_ring_equals_dense_sdpa(ranks):
    got = ranks(2, "dense_full")
    q, k, v, grad_out = got["inputs"]
    _check(got, _sdpa(q, k, v, grad_out, causal=False))


def _emulated_ring(q, k, v, world: int, config: OmniSparseConfig):
    """(out, lse, selected fraction of the allowed blocks): every rank's ring steps run in one process
    on the whole q, k, v (PyTorch's load-balanced schedule; module docstring), each step's selection
    by `method.plan` and its attention by the differentiable reference, merged by `merge_attention`."""
    cfg = cp.step_config(config, k.shape[2])
    chunk = q.shape[2] // (2 * world)
    counts = {"selected": 0, "allowed": 0}

    def rank_rows(t, rank):  # the rank's two chunks: rank and 2W - 1 - rank
        tail = 2 * world - 1 - rank
        return torch.cat(
            [t[:, :, rank * chunk : (rank + 1) * chunk], t[:, :, tail * chunk : (tail + 1) * chunk]], 2
        )

    def step(q_, k_, v_, causal):
        selection = plan(AttentionInputs(q_, k_, v_, None, causal, None), cfg)
        allowed = allowed_blocks(None, causal, *q_.shape[:3], k_.shape[2], cfg.block_size, q_.device)
        counts["selected"] += int(selection.kv_num_blocks.sum())
        counts["allowed"] += int(allowed.expand(*q_.shape[:2], -1, -1).sum())
        return sparse_attention(q_, k_, v_, selection, None, causal, None, cfg.query_chunk, check=False)

    chunk_out, chunk_lse = {}, {}
    for rank in range(world):
        q_r = rank_rows(q, rank)
        outs, lses = [], []
        for i in range(world):
            source = (rank - i) % world
            k_s, v_s = rank_rows(k, source), rank_rows(v, source)
            if i == 0:
                out, lse = step(q_r, k_s, v_s, True)
            elif source < rank:
                out, lse = step(q_r, k_s[:, :, :chunk], v_s[:, :, :chunk], False)
            else:  # the second chunk of queries only; the first sees none of these keys
                out, lse = step(q_r[:, :, chunk:], k_s, v_s, False)
                out = torch.cat([torch.zeros_like(out), out], 2)
                lse = torch.cat([torch.full_like(lse, float("-inf")), lse], 2)
            outs.append(out)
            lses.append(lse)
        out, lse = merge_attention(outs, lses)
        for half, index in enumerate((rank, 2 * world - 1 - rank)):
            chunk_out[index] = out[:, :, half * chunk : (half + 1) * chunk]
            chunk_lse[index] = lse[:, :, half * chunk : (half + 1) * chunk]
    order = range(2 * world)
    out = torch.cat([chunk_out[i] for i in order], 2)
    lse = torch.cat([chunk_lse[i] for i in order], 2)
    return out, lse, counts["selected"] / counts["allowed"]


@pytest.mark.parametrize("world", [2, 4])
def test_sparse_ring_equals_the_emulated_per_step_selection(ranks, world):
    got = ranks(world, "sparse_causal")
    q, k, v, grad_out = got["inputs"]
    q_, k_, v_ = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse, selected = _emulated_ring(q_, k_, v_, world, SPARSE)
    out.backward(grad_out)
    _check(got, {"out": out.detach(), "lse": lse.detach(), "dq": q_.grad, "dk": k_.grad, "dv": v_.grad},
           ("out", "lse", "dq", "dk", "dv"))  # fmt: skip
    # The case is sparse: the steps compute well under all allowed blocks, and the result is not dense.
    assert selected < 0.75, selected
    assert rel_error(got["out"], _sdpa(q, k, v, grad_out, causal=True)["out"]) > 10 * TOL


def test_compiled_backend_equals_the_eager_ring(ranks):
    got, eager = ranks(2, "compiled"), ranks(2, "exact_causal")
    _check(got, eager)
    q, k, v, grad_out = got["inputs"]
    _check(got, _sdpa(q, k, v, grad_out, causal=True))


@pytest.mark.parametrize("scenario", ["hf", "hf_compiled"])
def test_attention_interface_equals_the_single_process_model(ranks, scenario):
    from transformers import LlamaConfig, LlamaForCausalLM

    got = ranks(2, scenario)
    torch.manual_seed(0)  # the worker's weights (`context_parallel_worker._tiny_llama`)
    model = LlamaForCausalLM(LlamaConfig(**SMALL_LM, attn_implementation="sdpa")).eval()
    logits = model(input_ids=got["ids"], use_cache=False).logits
    (logits.square().sum() / 1000).backward()
    assert rel_error(got["logits"], logits.detach()) <= TOL
    assert rel_error(got["embed_grad"], model.get_input_embeddings().weight.grad) <= GRAD_TOL


@pytest.mark.parametrize("config", [EXACT, SPARSE], ids=["exact", "sparse"])
def test_backward_op_given_a_merged_output_returns_the_parts_share(config):
    """Two key sets' op calls, merged; each backward op call with the merged (out, lse) is that part's
    share: summed (dq) and concatenated (dk, dv) they equal autograd through the merge of the
    differentiable reference over the same selections."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 96, 16, generator=gen)
    k, v = (torch.randn(1, 2, 96, 16, generator=gen) for _ in range(2))
    grad_out = torch.randn(q.shape, generator=gen)
    parts = [slice(0, 40), slice(40, 96)]
    cfg = config.to_json()
    results = [
        torch.ops.omnisparse.attention(q, k[:, :, p], v[:, :, p], None, 0.0, False, None, True, cfg, "m")
        for p in parts
    ]
    out, lse = merge_attention(*zip(*results))
    grads = [
        torch.ops.omnisparse.attention_backward(
            grad_out, q, k[:, :, p], v[:, :, p], None, out, lse, False, None, True, cfg
        )
        for p in parts
    ]
    got = {"dq": grads[0][0] + grads[1][0], "dk": torch.cat([g[1] for g in grads], 2),
           "dv": torch.cat([g[2] for g in grads], 2)}  # fmt: skip
    q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k, v))
    references = []
    for p in parts:
        x = AttentionInputs(q_, k_[:, :, p], v_[:, :, p], None, False, None)
        references.append(
            sparse_attention(x.q, x.k, x.v, plan(x, config), None, False, None, config.query_chunk)
        )
    want_out, _ = merge_attention(*zip(*references))
    want_out.backward(grad_out)
    assert rel_error(out, want_out.detach()) <= TOL
    _check({"out": out, **got}, {"out": want_out.detach(), "dq": q_.grad, "dk": k_.grad, "dv": v_.grad})
    if config is EXACT:
        _check({"out": out, **got}, _sdpa(q, k, v, grad_out, causal=False))


def test_step_config_compares_min_seq_len_with_the_global_length():
    config = OmniSparseConfig(min_seq_len=4096, tau=0.9)
    assert cp.step_config(config, 8192) == config.replace(min_seq_len=0, max_head_dim=256)
    for short_or_dense in (cp.step_config(config, 2048), cp.step_config(config.replace(mode="dense"), 8192)):
        assert (short_or_dense.mode, short_or_dense.tau, short_or_dense.query_selection) == (
            "sparse",
            1.0,
            False,
        )


def _op_graph(**changes) -> torch.fx.GraphModule:
    """A graph of one ``omnisparse.attention`` call (causal, no mask unless ``changes`` say otherwise)."""
    graph = torch.fx.Graph()
    q, k, v, mask = (graph.placeholder(name) for name in ("q", "k", "v", "mask"))
    args = dict(attn_mask=None, is_causal=True, window=None) | changes
    args["attn_mask"] = mask if args["attn_mask"] else None
    node = graph.call_function(
        torch.ops.omnisparse.attention.default,
        (
            q,
            k,
            v,
            args["attn_mask"],
            0.0,
            args["is_causal"],
            None,
            True,
            EXACT.to_json(),
            "s",
            args["window"],
        ),
    )
    graph.output(node)
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def test_to_context_parallel_rewrites_causal_sites_and_refuses_the_rest():
    gm = _op_graph()
    assert cp.to_context_parallel(gm, "group0")
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert node.target is cp.CP_ATTENTION and node.args[8:10] == ("group0", True)
    for changes, match in (
        ({"attn_mask": True}, "mask"),
        ({"window": 8}, "window"),
        ({"is_causal": False}, "causal"),
    ):
        with pytest.raises(NotImplementedError, match=match):
            cp.to_context_parallel(_op_graph(**changes), "group0")
    assert cp.to_context_parallel(_op_graph(is_causal=False), "group0", load_balance=False)
