"""End-to-end prefill on pretrained models (GPU; not a test): eager SDPA, plain Inductor, and the
omnisparse backend in dense and sparse mode, at equal inputs.

For each model (`omnicompile.demos.models.load_pretrained`: ``smollm2-135m``, ``gemma3-270m``) and each
length S, one prompt of natural-language text (`omnicompile.evaluate.document_ids`), B = 1, bf16,
``use_cache=False``, the logits of the last ``--quality-tokens`` positions only:
- time of the whole forward (median, CUDA events) and compile time of each compiled variant;
- against eager SDPA on the same positions: top-1 agreement and the perplexity ratio; for sparse
  variants also against omnisparse dense (the same bf16 compiled graph with every site dense);
- for omnisparse variants, how many attention calls ran sparse vs dense (`omnicompile.recording`);
- with ``--graphs``, every compiled variant with ``mode="reduce-overhead"`` (Inductor's CUDA graphs,
  which replay the whole forward, the op's launches included, without host work).

SmolLM2 holds 8192 positions: past that, RoPE is scaled (``--rope-scaling``, default YaRN), by the
power of two that reaches the longest length, for every length (one model per run).
Run from ``benchmarks/`` (it imports ``bench_prefill``); prints a table last and writes
``models.json`` / ``models.csv`` to ``--out``. Stops starting new cases after ``--time-budget-s``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections import Counter
from pathlib import Path

import torch
from bench_prefill import cell, print_rows, time_ms, write_csv

from omnicompile.backend import backend
from omnicompile.config import OmniSparseConfig
from omnicompile.demos.models import load_pretrained
from omnicompile.evaluate import document_ids
from omnicompile.recording import recording

VARIANTS = ("eager", "inductor", "dense", "sparse")
NATIVE_POSITIONS = {"smollm2-135m": 8192, "gemma3-270m": 32768}


COLUMNS = {
    "model": cell("model", "s"),
    "S": cell("seq_len", "d"),
    "variant": cell("variant", "s"),
    "ms": cell("ms", ".1f"),
    "x eager": cell("speedup_vs_eager", ".2f"),
    "top-1": cell("top1", ".3f"),
    "ppl ratio": cell("ppl_ratio", ".4f"),
    "top-1 / ppl vs dense": lambda r: (
        f"{r['top1_vs_dense']:.3f} / {r['ppl_ratio_vs_dense']:.4f}" if "top1_vs_dense" in r else "-"
    ),
    "sparse/dense calls": lambda r: f"{r['sparse_calls']}/{r['dense_calls']}",
    "first call s": cell("first_call_s", ".1f"),
}


def load_for_length(name: str, seq_len: int, rope: str = "yarn", device: str = "cuda"):
    """(model, tokenizer), bf16 on CUDA (fp32 on the CPU), RoPE scaled by a power of two when
    ``seq_len`` passes the model's native length."""
    native = NATIVE_POSITIONS[name]
    kwargs = {}
    if seq_len > native:
        factor = float(2 ** math.ceil(math.log2(seq_len / native)))
        scaling = {"rope_type": rope, "factor": factor}
        if rope == "yarn":
            scaling["original_max_position_embeddings"] = native
        kwargs = dict(max_position_embeddings=int(native * factor), rope_scaling=scaling)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return load_pretrained(name, dtype=dtype, device=device, attn_implementation="sdpa", **kwargs)


GRAPHS = " @graphs"  # suffix of a variant compiled with mode="reduce-overhead" (CUDA graphs)


def _runner(model, variant: str, sparse: dict[str, OmniSparseConfig], dynamic: bool):
    if variant == "eager":
        return model
    base = variant.removesuffix(GRAPHS)
    mode = "reduce-overhead" if variant.endswith(GRAPHS) else None
    if base == "inductor":
        return torch.compile(model, dynamic=dynamic, mode=mode)
    config = OmniSparseConfig(mode="dense") if base == "dense" else sparse[base]
    return torch.compile(model, backend=backend(config), dynamic=dynamic, mode=mode)


def _profile(forward, path: Path, rows: int = 25) -> None:
    """The CUDA kernels of one ``forward()``, by total device time, to ``path`` (a text table)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        forward()
        torch.cuda.synchronize()
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows))


def _quality(logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement with ``reference`` and perplexity ratio on ``labels`` (logits [T, V])."""

    def nll(x: torch.Tensor) -> float:
        return torch.nn.functional.cross_entropy(x.float(), labels).item()

    return {
        "top1": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
        "ppl_ratio": math.exp(nll(logits) - nll(reference)),
    }


def run_model(
    name: str, args: argparse.Namespace, sparse: dict[str, OmniSparseConfig], deadline: float
) -> list[dict]:
    """Every (variant, length) of one model: loaded once for the longest length (one RoPE for all),
    each compiled variant compiled once (``--dynamic``: one graph for every length). ``sparse`` maps
    each sparse variant's name to its config; ``--profile`` writes the kernel table of every variant at
    the longest length to ``--out``."""
    model, tokenizer = load_for_length(name, max(args.seq_lens), args.rope_scaling, args.device)
    ids = {n: document_ids(tokenizer, n + 1).to(args.device) for n in args.seq_lens}
    references: dict[tuple[str, int], torch.Tensor] = {}
    rows: list[dict] = []
    # Sparse after dense (its quality is also taken against dense), plain Inductor last: each first
    # call compiles for 80-100 s on a GPU, and the time budget drops what comes last.
    variants = [v for v in args.variants if v not in ("sparse", "inductor")]
    variants += list(sparse) if "sparse" in args.variants else []
    variants += ["inductor"] if "inductor" in args.variants else []
    if args.graphs:
        variants = ["eager"] + [v + GRAPHS for v in variants if v != "eager"]
    for variant in variants:
        torch._dynamo.reset()
        runner = _runner(model, variant, sparse, args.dynamic)
        for seq_len in args.seq_lens:
            if time.monotonic() > deadline:
                print(f"time budget spent: skipping {name} {variant} at {seq_len}")
                continue
            inputs, labels = ids[seq_len][:, :-1], ids[seq_len][0, -args.quality_tokens :]

            def forward(runner=runner, inputs=inputs):
                with torch.no_grad():
                    return runner(inputs, use_cache=False, logits_to_keep=args.quality_tokens).logits[0]

            start = time.perf_counter()
            with recording(measure=False) as recorder:
                logits = forward().clone()  # a CUDA-graph replay overwrites its outputs
            if args.device == "cuda":
                torch.cuda.synchronize()
            first_s = time.perf_counter() - start
            base = variant.removesuffix(GRAPHS)
            if base in ("eager", "dense"):
                references[base, seq_len] = logits
            calls = Counter(run.decision for run in recorder.runs)
            row = {
                "model": name,
                "seq_len": seq_len,
                "variant": variant,
                "ms": time_ms(forward),
                "first_call_s": first_s,
                "sparse_calls": calls["sparse"],
                "dense_calls": calls["dense"],
            }
            if ("eager", seq_len) in references:
                row.update(_quality(logits, references["eager", seq_len], labels))
            if variant.startswith("sparse") and ("dense", seq_len) in references:
                vs_dense = _quality(logits, references["dense", seq_len], labels)
                row.update(top1_vs_dense=vs_dense["top1"], ppl_ratio_vs_dense=vs_dense["ppl_ratio"])
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.profile and args.device == "cuda" and seq_len == max(args.seq_lens):
                slug = re.sub(r"[^A-Za-z0-9._-]+", "_", variant).strip("_")
                _profile(forward, args.out / f"profile_{name}_{slug}_{seq_len}.txt")
    for row in rows:
        eager = next(
            (r["ms"] for r in rows if r["seq_len"] == row["seq_len"] and r["variant"] == "eager"), None
        )
        if eager:
            row["speedup_vs_eager"] = eager / row["ms"]
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(NATIVE_POSITIONS))
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument(
        "--config",
        nargs="+",
        default=["{}"],
        help="OmniSparseConfig fields of each sparse variant (JSON; one variant per value, named by it)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="kernel table of each variant at the longest S"
    )
    parser.add_argument(
        "--graphs",
        action="store_true",
        help=f"compiled variants with mode='reduce-overhead' (CUDA graphs; names end in '{GRAPHS}')",
    )
    parser.add_argument("--rope-scaling", default="yarn", choices=["yarn", "dynamic", "linear"])
    parser.add_argument(
        "--quality-tokens", type=int, default=256, help="last positions whose logits are kept"
    )
    parser.add_argument("--time-budget-s", type=float, default=480.0)
    parser.add_argument("--device", default="cuda", help="cuda (bf16) or cpu (fp32, a smoke test)")
    parser.add_argument(
        "--dynamic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compile one graph with a symbolic sequence length (--no-dynamic: one per length)",
    )
    parser.add_argument("--out", type=Path, default=Path("out/bench_models"))
    args = parser.parse_args()
    sparse = {
        "sparse" if fields == "{}" else f"sparse {fields}": OmniSparseConfig().replace(**json.loads(fields))
        for fields in args.config
    }
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    configs = {name: config.to_json() for name, config in sparse.items()}
    print(f"device: {device}; torch {torch.__version__}; sparse configs: {configs}")
    deadline = time.monotonic() + args.time_budget_s
    rows = [row for name in args.models for row in run_model(name, args, sparse, deadline)]
    (args.out / "models.json").write_text(json.dumps(rows, indent=1))
    write_csv(args.out / "models.csv", rows)
    print_rows("end-to-end prefill (ms; quality against eager SDPA)", COLUMNS, rows)


if __name__ == "__main__":
    main()
