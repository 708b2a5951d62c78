"""End-to-end prefill of the trained demonstration model (GPU; not a test).

The model is the 2-layer Llama that ``omnicompile train-demo`` trains on pair-token associative
recall (weights: ``assets/train_demo_dense`` by default, or a run's ``dense/`` or
``sparse_finetuned/`` folder; ``assets/train_demo_sparse`` is the sparse-fine-tuned one). For each
prompt length S the recall task is generated at S tokens (same vocabulary, pairs and queries as the
demo). The model was trained at 4096 tokens: past that, it is loaded with its RoPE scaled linearly
by S / 4096 (`omnicompile.demos.train_demo.load_model`; ``--no-rope-scaling`` keeps it as trained, which
measures raw length generalisation). One forward pass over the whole prompt
(``use_cache=False``, bf16 autocast on CUDA as in the demo, batch 1) is timed three ways:
- ``sdpa``: the model as loaded (transformers' SDPA attention, eager);
- ``inductor``: ``torch.compile(model)``, dense;
- ``omnisparse``: ``torch.compile(model, backend="omnisparse")`` with the demo's config.
Each way also reports answer accuracy over ``--batches`` sequences and, for omnisparse, what every
attention layer ran (sparse or dense, and why) with its density and exact recall.

Usage: ``python3 benchmarks/bench_trained_prefill.py [--weights DIR] [--seq-lens ...] [--tau T]``;
writes ``trained_prefill.csv`` to ``--out`` and prints a table last.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from bench_prefill import print_rows, time_ms, write_csv

from omnicompile.config import OmniSparseConfig
from omnicompile.demos.train_demo import FULL, RecallTask, evaluate, load_model, sparse_config
from omnicompile.recording import recording

ROOT = Path(__file__).resolve().parents[1]


def _layers(result: dict) -> str:
    """``L0: sparse 0.12 / 0.97`` (decision, density / mean exact recall) per attention layer."""
    return "  ".join(
        f"L{i}: {layer['decision']} {layer['density']:.2f} / {layer['recall_mean']:.3f}"
        for i, layer in enumerate(result["layers"])
    )


def _autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA as in the demo; off on the CPU (smoke runs)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _reasons(model, ids: torch.Tensor) -> str:
    """The dense reasons of one unmeasured forward ("" when every layer ran sparse)."""
    with torch.no_grad(), recording(measure=False) as recorder, _autocast(ids.device):
        model(input_ids=ids, use_cache=False)
    return "; ".join(sorted({run.reason for run in recorder.runs if run.reason}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, default=ROOT / "assets" / "train_demo_dense")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    parser.add_argument("--tau", type=float, default=OmniSparseConfig.tau)
    parser.add_argument("--batches", type=int, default=4, help="sequences per accuracy measurement")
    parser.add_argument("--device", default="cuda", help="cpu only to try the script (small --seq-lens)")
    parser.add_argument(
        "--no-rope-scaling", action="store_true", help="keep the trained RoPE past 4096 tokens"
    )
    parser.add_argument("--out", type=Path, default=Path("out/bench_trained_prefill"))
    args = parser.parse_args()
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    config = sparse_config(FULL, args.tau)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; weights: {args.weights}; config: {config.to_json()}")
    rows = []
    for seq_len in args.seq_lens:
        torch._dynamo.reset()  # the three ways share the model's code: keep them under the recompile limit
        model = load_model(args.weights, None if args.no_rope_scaling else seq_len).to(device).eval()
        ways = {
            "sdpa": model,
            "inductor": torch.compile(model, dynamic=False),
            "omnisparse": torch.compile(model, backend="omnisparse", options=config.to_dict(), dynamic=False),
        }
        task = RecallTask(
            seq_len, FULL.finetune.pairs, FULL.finetune.queries, FULL.vocab_items, FULL.vocab_items
        )
        ids, _ = task.batch(1, torch.Generator().manual_seed(seq_len), device)
        baseline = None
        for name, way in ways.items():

            def forward(way=way) -> None:
                with torch.no_grad(), _autocast(device):
                    way(input_ids=ids, use_cache=False)

            ms = time_ms(forward, max_reps=20)
            baseline = baseline or ms
            result = evaluate(way, task, args.batches, 1, seed=1, device=device, measure=name == "omnisparse")
            row = {
                "seq_len": seq_len,
                "rope_factor": model.config.rope_parameters.get("factor", 1.0),
                "way": name,
                "prefill_ms": ms,
                "speedup_vs_sdpa": baseline / ms,
                "accuracy": result["accuracy"],
                "layers": _layers(result) if result["layers"] else "",
                "dense_reasons": _reasons(way, ids) if name == "omnisparse" else "",
            }
            rows.append(row)
            print(row, flush=True)
            torch.cuda.empty_cache()
    write_csv(args.out / "trained_prefill.csv", rows)
    print_rows(
        f"trained demo model, end-to-end prefill (B = 1, tau {args.tau})",
        {
            "S": lambda row: str(row["seq_len"]),
            "RoPE scale": lambda row: f"{row['rope_factor']:g}",
            "way": lambda row: row["way"],
            "prefill ms": lambda row: f"{row['prefill_ms']:.2f}",
            "vs sdpa": lambda row: f"{row['speedup_vs_sdpa']:.2f}x",
            "accuracy": lambda row: f"{row['accuracy']:.3f}",
            "layers (decision density / recall)": lambda row: (
                row["layers"] + (f" [{row['dense_reasons']}]" if row["dense_reasons"] else "")
            ),
        },
        rows,
    )


if __name__ == "__main__":
    main()
