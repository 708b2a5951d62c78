"""Slim KV cache against kvpress presses on the trained demonstration model (not a test).

kvpress (NVIDIA's library of KV cache compression methods) pins ``transformers < 5.3`` and its hooks
fail on later releases, so this script runs in an environment with transformers 5.2 (the GPU image
has 5.17: there kvpress does not run). The model is tiny, so the CPU is enough.

Model: the 2-layer Llama of ``omnicompile train-demo`` (``assets/train_demo_dense`` by default),
trained here on pair-token associative recall, whose layer-1 heads retrieve one far token per query.
Data: the demo's recall task at ``--seq-len`` tokens. The prompt is the context (the first three
quarters: the pair tokens among filler), so it is compressed before any question arrives (the
query-agnostic setting of a cache kept across turns); the query section (16 query keys, each
followed by its answer, among filler) is then fed as one teacher-forced decode chunk on the
compressed cache (token by token for AdaKV, whose masking needs it), positions continuing the
prompt's.

Ways, each on the same sequences, for each ``--tau-decode`` setting of the slim cache:
- ``dense``: DynamicCache, SDPA;
- ``slim``: `SlimKVCache` (METHOD.md section 4: local heads keep sink + recent, retrieval heads keep
  the blocks holding ``tau_decode`` of the observed mass), ``attn_implementation="omnisparse_decode"``;
- kvpress presses at the slim cache's measured compression (its stored prompt bytes over the dense
  ones, averaged over the sequences): SnapKV (observation-window scores, the same 64 last prompt
  queries), AdaKV over SnapKV (head-adaptive budgets, as ours), StreamingLLM (sink + recent).

Reported per way: answer accuracy, top-1 agreement with the dense run over every decoded position,
logits relative error, stored prompt KV bytes (measured from the cache tensors; AdaKV masks entries
instead of removing them, so its stored bytes do not shrink, which the table shows).

Usage:
``python benchmarks/compare_kvpress.py [--weights DIR] [--seq-len 4096] [--sequences 8] [--tau-decode ...]``;
writes ``kvpress.csv`` to ``--out`` and prints a table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
from collections.abc import Callable
from pathlib import Path

import kvpress
import torch
from bench_prefill import print_rows, write_csv
from transformers import DynamicCache, LlamaForCausalLM

from omnicompile.config import OmniSparseConfig
from omnicompile.demos.train_demo import FULL, RecallTask, sparse_config
from omnicompile.hf_cache import ATTN_IMPLEMENTATION, SlimKVCache
from omnicompile.kernels.decode.slim_kv import storage_bytes
from omnicompile.metrics import relative_error

ROOT = Path(__file__).resolve().parents[1]


def _dense_bytes(cache: DynamicCache) -> int:
    return storage_bytes(*[t for layer in cache.layers for t in (layer.keys, layer.values)])


def _run(
    model, ids: torch.Tensor, prompt_len: int, cache, attn: str, press=None, chunk: int | None = None
) -> tuple[torch.Tensor, int]:
    """Prefill ``ids[:, :prompt_len]`` (under ``press`` when given), then the rest in chunks of
    ``chunk`` tokens (None = one chunk), teacher-forced.

    Returns the decoded positions' logits float32 [n, vocab] (row i predicts token prompt_len + i + 1)
    and the cache's stored bytes after the prefill.
    """
    model.set_attn_implementation(attn)
    with torch.no_grad():
        if press is None:
            model(ids[:, :prompt_len], past_key_values=cache, logits_to_keep=1)
        else:
            with press(model):
                model(ids[:, :prompt_len], past_key_values=cache, logits_to_keep=1)
        stored = cache.stored_bytes() if isinstance(cache, SlimKVCache) else _dense_bytes(cache)
        logits = []
        for start in range(prompt_len, ids.shape[1], chunk or ids.shape[1]):
            end = min(ids.shape[1], start + (chunk or ids.shape[1]))
            positions = torch.arange(start, end, device=ids.device)[None]
            logits.append(
                model(ids[:, start:end], past_key_values=cache, position_ids=positions).logits[0].float()
            )
    return torch.cat(logits), stored


def _scores(name: str, result: dict, dense: dict, batches: list, prompt_len: int) -> dict:
    """Answer accuracy, top-1 agreement and logits error of ``result`` against the dense run."""
    correct = total = agree = positions = 0
    for (_, labels), logits, dense_logits in zip(batches, result["logits"], dense["logits"]):
        predicted = logits[:-1].argmax(-1)  # row i predicts token prompt_len + i + 1
        targets = labels[0, prompt_len + 1 :]
        answers = targets != -100
        correct += (predicted[answers] == targets[answers]).sum().item()
        total += answers.sum().item()
        agree += (logits.argmax(-1) == dense_logits.argmax(-1)).sum().item()
        positions += logits.shape[0]
    return {
        "way": name,
        "accuracy": correct / total,
        "top1_agreement": agree / positions,
        "logits_rel_err": relative_error(torch.cat(result["logits"]), torch.cat(dense["logits"])),
        "prompt_kv_bytes": result["stored"],
        "memory_ratio": dense["stored"] / result["stored"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, default=ROOT / "assets" / "train_demo_dense")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument(
        "--tau-decode",
        type=float,
        nargs="+",
        default=[OmniSparseConfig.tau_decode, 0.8, 0.5],
        help="slim settings; kvpress runs at each one's measured compression",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("out/compare_kvpress"))
    args = parser.parse_args()
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    model = LlamaForCausalLM.from_pretrained(args.weights, dtype=torch.float32).to(device).eval()
    task = RecallTask(
        args.seq_len, FULL.finetune.pairs, FULL.finetune.queries, FULL.vocab_items, FULL.vocab_items
    )
    prompt_len = (3 * args.seq_len) // 4  # the task's context end: every pair, no query
    base = dataclasses.replace(sparse_config(FULL, OmniSparseConfig.tau), min_seq_len=prompt_len)
    print(f"kvpress {importlib.metadata.version('kvpress')}; slim config: {base.to_json()}")
    gen = torch.Generator().manual_seed(7)
    batches = [task.batch(1, gen, device) for _ in range(args.sequences)]

    def collect(make_cache: Callable[[], object], attn: str, press=None, chunk: int | None = None) -> dict:
        runs = [_run(model, ids, prompt_len, make_cache(), attn, press, chunk) for ids, _ in batches]
        return {"logits": [r[0] for r in runs], "stored": sum(r[1] for r in runs) / len(runs)}

    dense = collect(DynamicCache, "sdpa")
    rows = [{"tau_decode": "", **_scores("dense", dense, dense, batches, prompt_len)}]
    for tau_decode in args.tau_decode:
        config = dataclasses.replace(base, tau_decode=tau_decode)
        results = {
            "slim": collect(lambda config=config: SlimKVCache(model.config, config), ATTN_IMPLEMENTATION)
        }
        compression = 1.0 - results["slim"]["stored"] / dense["stored"]
        presses = {
            "kvpress SnapKV": kvpress.SnapKVPress(
                compression_ratio=compression, window_size=config.obs_window
            ),
            "kvpress AdaKV(SnapKV)": kvpress.AdaKVPress(
                kvpress.SnapKVPress(compression_ratio=compression, window_size=config.obs_window)
            ),
            "kvpress StreamingLLM": kvpress.StreamingLLMPress(
                compression_ratio=compression, n_sink=config.n_sink * config.block_size
            ),
        }
        for name, press in presses.items():
            # AdaKV masks evicted keys with a fake key per head that every query must ignore, which it finds
            # for one query at a time only: its decode goes token by token (the same computation).
            results[name] = collect(DynamicCache, "sdpa", press, chunk=1 if "AdaKV" in name else None)
        for name, result in results.items():
            rows.append({"tau_decode": tau_decode, **_scores(name, result, dense, batches, prompt_len)})
            print(rows[-1], flush=True)
    write_csv(args.out / "kvpress.csv", rows)
    print_rows(
        f"trained demo model, {args.sequences} sequences of {args.seq_len} tokens, prompt {prompt_len}; "
        "kvpress at the compression of the slim row above it",
        {
            "slim tau_decode": lambda row: str(row["tau_decode"]),
            "way": lambda row: row["way"],
            "answer accuracy": lambda row: f"{row['accuracy']:.3f}",
            "top-1 agreement": lambda row: f"{row['top1_agreement']:.3f}",
            "logits rel err": lambda row: f"{row['logits_rel_err']:.3f}",
            "prompt KV bytes": lambda row: f"{row['prompt_kv_bytes'] / 1e6:.2f} MB",
            "memory ratio": lambda row: f"{row['memory_ratio']:.2f}x",
        },
        rows,
        width=160,
    )


if __name__ == "__main__":
    main()
