"""Context-parallel prefill benchmark (multi-GPU; not a test): OmniSparse over PyTorch's ring against
PyTorch's dense context-parallel SDPA on the same mesh (docs/CONTEXT_PARALLEL.md).

One command runs every mesh size up to the launched world (ranks >= W wait while a W-rank mesh runs)::

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 8 benchmarks/bench_context_parallel.py \\
        --out results/context_parallel

Cases, for each sequence length S (``--seq-lens``, default 128K, 512K, 1M) and mesh size W (``--worlds``,
default 2, 4, 8), causal, load-balanced (head-tail) shards, forward (prefill) only:
- ``mixed`` (``--presets``): `omnicompile.demos.structured` heads of differing breadth, B = 1, H = 32,
  Hkv = 8, D = 128, bf16: ``omnisparse_cp`` (`omnicompile.context_parallel.context_parallel_attention`)
  and ``sdpa_cp``: the same PyTorch ring (``_templated_ring_attention``, same sharding and rotation)
  with the flash kernel at every step (``aten._scaled_dot_product_flash_attention``; its GQA by
  repeating K/V inside each step, after the communication, so both move the same bytes);
- ``--models`` (default ``smollm2-135m``, its own shape: 9 / 3 heads, D = 64, RoPE scaled past 8192
  positions as in bench_models.py): one forward of the whole model on the document text (repeated past
  its length), ``attn_implementation="omnisparse_cp"`` against an ``"sdpa_cp"`` implementation that
  runs the flash ring above; logits relative error against it.
Columns: median and min milliseconds (CUDA events, barrier before each repetition; the slowest rank's
time), speed-up over ``sdpa_cp``, scaling efficiency T(W0) W0 / (T(W) W) against the smallest W run for
that case, the bytes each rank receives (computed from the engine's collectives: the all-gather of the
K/V shards, (W - 1) shards per rank; identical for both methods: the ring moves every shard), the
fraction of ring steps that ran the sparse path, the output's relative error against ``sdpa_cp``.

Writes ``context_parallel.csv`` to ``--out`` (rank 0) and prints it. ``--device cpu`` (gloo, the
pure-PyTorch references) is a smoke check of the plumbing only, e.g.
``torchrun --nproc-per-node 2 benchmarks/bench_context_parallel.py --device cpu --seq-lens 1024
--worlds 2 --heads 8 --kv-heads 2 --head-dim 64 --block-size 16 --min-seq-len 0 --out /tmp/cp``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from omnicompile import context_parallel as cp
from omnicompile.config import OmniSparseConfig
from omnicompile.demos.structured import structured_qkv
from omnicompile.recording import recording

METHODS = ("sdpa_cp", "omnisparse_cp")


def flash_step(q, k, v, *, is_causal: bool, scale: float | None = None):
    """One ring step of dense attention: PyTorch's flash kernel (CPU: its CPU flash), (out, lse)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    if q.device.type == "cuda":
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, scale=scale)
    else:
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)
    return out[0], out[1]


def sdpa_ring(q, k, v, mesh: DeviceMesh, scale: float | None = None) -> torch.Tensor:
    """PyTorch's dense context-parallel SDPA: its ring with the flash kernel per step (causal, balanced)."""
    with torch.no_grad(), cp._Engine.load_balance(True):
        return cp._Engine.ring_forward(mesh.get_group(), flash_step, q, k, v, True, scale=scale)[0]


def _timed(fn, reps: int, mesh: DeviceMesh, device: torch.device) -> tuple[float, float, object]:
    """(median ms, min ms, last result) of ``fn()``, the slowest rank's time of each repetition."""
    group = mesh.get_group()
    result = fn()  # warm-up (and the result)
    times = []
    for _ in range(reps):
        dist.barrier(group)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = torch.tensor([(time.perf_counter() - start) * 1e3], device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
        times.append(elapsed.item())
    return statistics.median(times), min(times), result


def _rel_error(out: torch.Tensor, ref: torch.Tensor, mesh: DeviceMesh) -> float:
    """||out - ref|| / ||ref|| over every rank's rows."""
    sums = torch.stack([(out.float() - ref.float()).square().sum(), ref.float().square().sum()])
    dist.all_reduce(sums, group=mesh.get_group())
    return (sums[0] / sums[1].clamp_min(1e-30)).sqrt().item()


def _sparse_steps(fn) -> float:
    """The fraction of the op's calls (ring steps, every layer) that ran the sparse path in one ``fn()``."""
    with recording(measure=False) as recorder:
        fn()
    runs = recorder.runs
    return sum(run.decision == "sparse" for run in runs) / max(len(runs), 1)


def _kv_bytes(k: torch.Tensor, world: int) -> int:
    """Bytes one rank receives in the forward ring: the other W - 1 ranks' K and V shards."""
    return 2 * k.numel() * k.element_size() * (world - 1)


def preset_rows(args, preset: str, seq: int, mesh: DeviceMesh, device) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = structured_qkv(
        preset, 1, args.heads, args.kv_heads, seq, args.head_dim, dtype=dtype, device=device
    )
    q, k, v = cp.shard(mesh, [q, k, v], [2, 2, 2])
    if device.type == "cuda":
        torch.cuda.empty_cache()
    config = _config(args)
    runs = {
        "sdpa_cp": lambda: sdpa_ring(q, k, v, mesh),
        "omnisparse_cp": lambda: cp.context_parallel_attention(q, k, v, mesh, enable_gqa=True, config=config)[
            0
        ],
    }
    rows, outs = [], {}
    for method, fn in runs.items():
        with torch.no_grad():
            median, best, outs[method] = _timed(fn, args.reps, mesh, device)
            sparse = _sparse_steps(fn) if method == "omnisparse_cp" else 0.0
        rows.append(dict(method=method, ms=median, ms_min=best, sparse_steps=sparse))
    for row in rows:
        row["rel_error"] = _rel_error(outs[row["method"]], outs["sdpa_cp"], mesh)
        row["recv_bytes_per_rank"] = _kv_bytes(k, mesh.size())
    return rows


def _sdpa_cp_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """A transformers attention function: `sdpa_ring` (the model's dense context-parallel baseline)."""
    mesh = module.config.omnisparse_cp_mesh
    return sdpa_ring(query, key, value, mesh, scaling).transpose(1, 2).contiguous(), None


def model_rows(args, name: str, seq: int, mesh: DeviceMesh, device) -> list[dict]:
    from bench_models import load_for_length
    from transformers import AttentionInterface

    from omnicompile.evaluate import document_ids

    AttentionInterface.register("sdpa_cp", _sdpa_cp_attention)
    model, tokenizer = load_for_length(name, seq, "yarn", device.type)
    text = document_ids(tokenizer, min(seq, 60_000))
    ids = text.repeat(1, -(-seq // text.shape[1]))[:, :seq].to(device)
    ids, positions = cp.shard(mesh, [ids, torch.arange(seq, device=device).unsqueeze(0)], [1, 1])
    model.config.omnisparse_cp_mesh = mesh

    def forward(implementation: str):
        if implementation == "sdpa_cp":
            model.set_attn_implementation("sdpa_cp")
        else:
            cp.set_context_parallel(model, mesh, _config(args))
        return lambda: model(input_ids=ids, position_ids=positions, use_cache=False).logits

    rows, outs = [], {}
    for method in METHODS:
        fn = forward(method)
        with torch.no_grad():
            median, best, outs[method] = _timed(fn, args.reps, mesh, device)
            sparse = _sparse_steps(fn) if method == "omnisparse_cp" else 0.0
        rows.append(dict(method=method, ms=median, ms_min=best, sparse_steps=sparse))
    kv = model.config.num_key_value_heads * (model.config.hidden_size // model.config.num_attention_heads)
    per_layer = 2 * ids.shape[1] * kv * next(model.parameters()).element_size() * (mesh.size() - 1)
    for row in rows:
        row["rel_error"] = _rel_error(outs[row["method"]], outs["sdpa_cp"], mesh)
        row["recv_bytes_per_rank"] = per_layer * model.config.num_hidden_layers
    return rows


def _config(args) -> OmniSparseConfig:
    return OmniSparseConfig(tau=args.tau, block_size=args.block_size, min_seq_len=args.min_seq_len)


def _efficiency(rows: list[dict]) -> None:
    """Scaling efficiency of each row against the smallest world of its case, length and method."""
    for row in rows:
        peers = [
            r
            for r in rows
            if (r["case"], r["seq_len"], r["method"]) == (row["case"], row["seq_len"], row["method"])
        ]
        base = min(peers, key=lambda r: r["world"])
        row["scaling_efficiency"] = base["ms"] * base["world"] / (row["ms"] * row["world"])
        dense = [r for r in rows if (r["case"], r["seq_len"], r["world"], r["method"]) ==
                 (row["case"], row["seq_len"], row["world"], "sdpa_cp")]  # fmt: skip
        row["speedup_vs_sdpa_cp"] = dense[0]["ms"] / row["ms"] if dense else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[131072, 524288, 1048576])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--presets", nargs="*", default=["mixed"])
    parser.add_argument("--models", nargs="*", default=["smollm2-135m"])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tau", type=float, default=0.95)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--min-seq-len", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    cuda = args.device == "cuda"
    rank = int(os.environ["RANK"])
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")
    launched = dist.get_world_size()
    rows: list[dict] = []
    for world in sorted(w for w in args.worlds if w <= launched):
        group = dist.new_group(list(range(world)))  # every rank takes part in creating it
        if rank < world:
            mesh = DeviceMesh.from_group(group, device.type)
            for seq in args.seq_lens:
                cases = [("preset", p) for p in args.presets] + [("model", m) for m in args.models]
                for kind, name in cases:
                    run = preset_rows if kind == "preset" else model_rows
                    for row in run(args, name, seq, mesh, device):
                        rows.append(dict(case=name, seq_len=seq, world=world, **row))
                        if rank == 0:
                            print(rows[-1], flush=True)
        dist.barrier()
    if rank == 0:
        _efficiency(rows)
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "context_parallel.csv"
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {path}")
        for row in rows:
            print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
