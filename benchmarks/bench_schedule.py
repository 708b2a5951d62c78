"""Timings of the sparse forward's two work orders and of the op without host synchronisation (GPU; not a
test: that both orders give bitwise equal results is tests/gpu/test_schedule.py).

    python benchmarks/bench_schedule.py [--seq-lens 32768 131072] [--out DIR]

B = 1, H = 32, Hkv = 8, D = 128, bf16, causal; presets ``mixed`` and ``mixed_flat``
(`omnicompile.demos.structured`); budget scopes heads, kv_group, head (default config otherwise). Per case:
- the forward (`triton_fwd.sparse_attention`) on one selection with ``schedule="heaviest_first"`` and
  ``"causal"``: ms and TFLOP/s on the computed blocks (4 * D * b^2 per block);
- the op (`torch.ops.omnisparse.attention`) end to end: eager, eager plus one host synchronisation
  per call (what the removed per-call density read cost: ``.item()`` of a device scalar), and
  replayed from a CUDA graph (possible now that the op never synchronises); beside cuDNN SDPA.
Prints one line per case and a table last; writes ``bench_schedule.json``. About 2-3 minutes on one H100.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from bench_prefill import dense_sdpa, graphed, time_ms
from torch.nn.attention import SDPBackend

from omnicompile.config import OmniSparseConfig
from omnicompile.demos.structured import structured_qkv
from omnicompile.kernels.sparse_attention.launch import default_launch
from omnicompile.kernels.sparse_attention.triton_fwd import sparse_attention
from omnicompile.method import AttentionInputs, plan

PRESETS = ("mixed", "mixed_flat")
SCOPES = ("heads", "kv_group", "head")
HEADS, KV_HEADS, DIM = 32, 8, 128


def run_case(preset: str, seq: int, scope: str, inputs, cudnn_ms: float) -> dict:
    q, k, v = inputs
    config = OmniSparseConfig(budget_scope=scope)
    selection = plan(AttentionInputs(q, k, v, None, True, None), config)
    blocks = selection.kv_num_blocks.sum().item()
    allowed = HEADS * (seq // 64) * (seq // 64 + 1) // 2
    flops = 4 * DIM * config.block_size**2 * blocks
    row = {"preset": preset, "S": seq, "scope": scope, "density": blocks / allowed, "cudnn_ms": cudnn_ms}
    for schedule in ("heaviest_first", "causal"):
        launch = dataclasses.replace(
            default_launch(config.block_size, q.dtype, False, DIM), schedule=schedule
        )

        def forward(launch=launch):
            return sparse_attention(q, k, v, selection, None, True, None, launch=launch)

        ms = time_ms(forward)
        row[f"fwd_{schedule}_ms"] = ms
        row[f"fwd_{schedule}_tflops"] = flops / (ms * 1e9)
    row["fwd_speedup"] = row["fwd_causal_ms"] / row["fwd_heaviest_first_ms"]
    cfg_json = config.to_json()

    def op():
        return torch.ops.omnisparse.attention(q, k, v, None, 0.0, True, None, True, cfg_json, "s", None, None)

    def op_synced():
        out = op()
        out[1][0, 0, 0].item()  # the stall the per-call density read caused
        return out

    row["op_eager_ms"] = time_ms(op)
    row["op_eager_sync_ms"] = time_ms(op_synced)
    row["op_graph_ms"] = time_ms(graphed(op))
    row["x_cudnn_graph"] = cudnn_ms / row["op_graph_ms"]
    return row


def _cell(x) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--out", type=Path, default=Path("out/bench_schedule"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__}", flush=True)
    rows = []
    for seq in args.seq_lens:
        for preset in PRESETS:
            inputs = structured_qkv(
                preset, 1, HEADS, KV_HEADS, seq, DIM, dtype=torch.bfloat16, device="cuda", seed=0
            )
            cudnn_ms = time_ms(dense_sdpa(*inputs, SDPBackend.CUDNN_ATTENTION)[0])
            for scope in SCOPES:
                rows.append(run_case(preset, seq, scope, inputs, cudnn_ms))
                print(json.dumps(rows[-1]), flush=True)
            del inputs
            torch.cuda.empty_cache()
    (args.out / "bench_schedule.json").write_text(json.dumps(rows, indent=1))
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(_cell(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
