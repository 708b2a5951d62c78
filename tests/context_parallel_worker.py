"""One rank of the context-parallel tests (tests/test_context_parallel.py starts W of them; not collected).

Usage: ``python tests/context_parallel_worker.py RANK WORLD PORT OUT SCENARIO...``. Joins a gloo group of
WORLD processes on 127.0.0.1:PORT, runs each scenario of `SCENARIOS` (every rank the same, in order)
and, on rank 0, saves ``OUT/<scenario>.pt``: the whole inputs it used and the unsharded outputs and
gradients, for the test to compare with single-process references.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from omnicompile import OmniSparseConfig
from omnicompile import context_parallel as cp
from omnicompile.demos.structured import structured_qkv

# The repository root last on the path: tests.helpers importable, the PyPI package `kernels` still first.
sys.path.append(str(Path(__file__).resolve().parents[1]))
from tests.helpers import SMALL_LM  # noqa: E402

BLOCK = 16
EXACT = OmniSparseConfig(tau=1.0, query_selection=False, block_size=BLOCK, granularity=4, min_seq_len=0)
SPARSE = OmniSparseConfig(tau=0.9, block_size=BLOCK, granularity=4, min_seq_len=0)
DENSE = OmniSparseConfig(mode="dense")
CONFIGS = {"exact": EXACT, "sparse": SPARSE, "dense": DENSE}
SMALL_STRUCTURE = dict(
    window=16, slash_period=96, slashes=1, stripes=2, stripe_width=16, needles=2, needle_len=16
)


def _inputs(kind: str, seq: int, seed: int) -> tuple[torch.Tensor, ...]:
    """q [1, 4, S, 32], k, v [1, 2, S, 32] fp32 (random, or structured: sparse attention) and a cotangent."""
    if kind == "structured":
        q, k, v = structured_qkv("mixed", 1, 4, 2, seq, 32, seed=seed, **SMALL_STRUCTURE)
    else:
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(1, 4, seq, 32, generator=gen)
        k, v = (torch.randn(1, 2, seq, 32, generator=gen) for _ in range(2))
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1))
    return q, k, v, grad_out


def _ring(mesh, q, k, v, grad_out, causal, config, attend=None):
    """Shard, attend (`cp.context_parallel_attention`, or ``attend(q, k, v)`` -> out), backward, unshard."""
    balance = causal
    shards = [t.requires_grad_() for t in cp.shard(mesh, [q, k, v], [2, 2, 2], load_balance=balance)]
    (grad_shard,) = cp.shard(mesh, [grad_out], [2], load_balance=balance)
    if attend is None:
        out, lse = cp.context_parallel_attention(
            *shards, mesh, is_causal=causal, enable_gqa=True, config=config, load_balance=balance
        )
        lse = lse.detach()
    else:
        out, lse = attend(*shards), None
    out.backward(grad_shard)
    gathered = [out.detach()] + [t.grad for t in shards] + ([] if lse is None else [lse])
    return dict(
        zip(("out", "dq", "dk", "dv", "lse"), cp.unshard(mesh, gathered, [2] * len(gathered), balance))
    )


def scenario_attention(mesh, name: str) -> dict:
    """``<config>_<causal|full>``: the function on 256 random tokens (exact, dense) or 512 structured ones."""
    config_name, masking = name.split("_")
    kind, seq = ("structured", 512) if config_name == "sparse" else ("random", 256)
    q, k, v, grad_out = _inputs(kind, seq, seed=3)
    result = _ring(mesh, q, k, v, grad_out, masking == "causal", CONFIGS[config_name])
    return {"inputs": (q, k, v, grad_out), **result}


def scenario_compiled(mesh, _name: str) -> dict:
    """SDPA in a compiled function, ``torch.compile`` with `cp.backend` (Inductor), exact config."""
    q, k, v, grad_out = _inputs("random", 256, seed=3)

    def attention(q_, k_, v_):
        return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, enable_gqa=True)

    compiled = torch.compile(attention, backend=cp.backend(mesh, EXACT), fullgraph=True)
    return {"inputs": (q, k, v, grad_out), **_ring(mesh, q, k, v, grad_out, True, EXACT, compiled)}


def _tiny_llama(implementation: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMALL_LM, attn_implementation=implementation)).eval()


def scenario_hf(mesh, name: str) -> dict:
    """A tiny Llama switched to ``"omnisparse_cp"`` (exact config) on 128 tokens: the logits and the
    gradient of the embeddings; ``hf_compiled``: under ``torch.compile(backend="aot_eager")``."""
    seq = 128
    ids = torch.randint(0, SMALL_LM["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(5))
    model = _tiny_llama("sdpa")
    cp.set_context_parallel(model, mesh, EXACT)
    ids_shard, positions = cp.shard(mesh, [ids, torch.arange(seq).unsqueeze(0)], [1, 1])
    forward = torch.compile(model, backend="aot_eager", fullgraph=True) if name == "hf_compiled" else model
    logits = forward(input_ids=ids_shard, position_ids=positions, use_cache=False).logits
    (logits.square().sum() / 1000).backward()  # summed over the ranks: the whole logits' loss
    embed_grad = model.get_input_embeddings().weight.grad.clone()
    dist.all_reduce(embed_grad)
    (full_logits,) = cp.unshard(mesh, [logits.detach()], [1])
    return {"ids": ids, "logits": full_logits, "embed_grad": embed_grad, "tokens": seq * 1.0}


SCENARIOS = {
    "exact_causal": scenario_attention,
    "sparse_causal": scenario_attention,
    "dense_full": scenario_attention,
    "compiled": scenario_compiled,
    "hf": scenario_hf,
    "hf_compiled": scenario_hf,
}


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    mesh = init_device_mesh("cpu", (world,))
    try:
        for name in sys.argv[5:]:
            result = SCENARIOS[name](mesh, name)
            if rank == 0:
                torch.save(result, out / f"{name}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
