"""Exported-package benchmark (GPU; not a test): AOTInductor package with OmniSparse attention.

Three ways to run one Llama-architecture model (random weights from a config, bf16, batch 1,
causal prefill, last-token logits), each measured in a fresh process with empty Triton and Inductor
caches (a cold start):

- ``sparse_package``: `omnicompile.export.export` (attention -> the op, AOTInductor ``.pt2``);
- ``dense_package``: the same model through ``torch.export`` + AOTInductor, attention untouched;
- ``compiled``: ``torch.compile(backend=omnicompile.backend(config), dynamic=True)``.

Both packages are exported once with a dynamic sequence length, loaded with
`omnicompile.load_package` and run at every ``--seq-lens``.
Per way: load time (package load; model build for ``compiled``), first-call time at each length
(compilation included for ``compiled``, Triton JIT of our kernels for the sparse package) and
steady-state time (median of ``--reps``). Correctness: the sparse package must equal the compiled
model (both run our Triton kernels on CUDA) within bf16 tolerance, and every attention call of the
package must have run the sparse path (recorded); the error against the dense package is reported.

The model attends through an attention function registered here (``causal_sdpa``: SDPA with
``is_causal=True``, no mask tensor) because transformers materialises a [S, S] mask whenever it is
exported. Random weights give near-flat attention, so ``--max-blocks`` caps the selection: the
numbers measure the package and the kernels at that density, not the method's accuracy.

Writes ``export.csv``, ``export_times.json`` (and each way's rows and logits) to ``--out``, packages
to a temporary folder; prints a table last. Expect several minutes on an H100 machine, most of
it compilation.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

WAYS = ("sparse_package", "dense_package", "compiled")
BF16_TOL = 2e-2


def causal_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function: causal SDPA over the KV heads (GQA), no mask tensor."""
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


class LastLogits(torch.nn.Module):
    """A causal LM's prefill returning the last position's logits [B, vocab]."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits[:, -1]


def build(layers: int, device: str) -> LastLogits:
    """The benchmark model: a Llama (head dim 64, 8 query / 2 KV heads), seeded random weights."""
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

    AttentionInterface.register("causal_sdpa", causal_sdpa)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=131072,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    model.set_attn_implementation("causal_sdpa")
    return LastLogits(model)


def sparse_config(args: argparse.Namespace):
    from omnicompile import OmniSparseConfig

    return OmniSparseConfig(
        tau=args.tau, block_size=args.block_size, min_seq_len=args.min_seq_len, max_blocks=args.max_blocks
    )


def input_ids(length: int, device: str) -> torch.Tensor:
    return torch.randint(0, 32000, (1, length), generator=torch.Generator().manual_seed(length)).to(device)


def export_packages(args: argparse.Namespace, work: Path) -> dict[str, float]:
    """Write both packages to ``work``; returns their export times in seconds.

    A throwaway package is compiled first (``aoti_warmup``): the first AOTInductor compilation in a
    process pays a one-time start-up (on an H100 machine the first export took 88 s, the next 15 s),
    which would otherwise land on whichever package comes first.
    """
    from torch._inductor import aoti_compile_and_package

    from omnicompile.export import export

    times = {}
    start = time.perf_counter()
    warmup = torch.export.export(
        torch.nn.Linear(8, 8, device=args.device), (torch.randn(2, 8, device=args.device),)
    )
    aoti_compile_and_package(warmup, package_path=str(work / "warmup.pt2"))
    times["aoti_warmup"] = time.perf_counter() - start
    model = build(args.layers, args.device)
    example = (input_ids(args.example_len, args.device),)
    seq = torch.export.Dim("seq", min=args.block_size, max=max(args.seq_lens))
    start = time.perf_counter()
    export(model, example, work / "sparse_package.pt2", sparse_config(args), dynamic={"input_ids": {1: seq}})
    times["sparse_package"] = time.perf_counter() - start
    start = time.perf_counter()
    program = torch.export.export(model, example, dynamic_shapes={"input_ids": {1: seq}})
    aoti_compile_and_package(program, package_path=str(work / "dense_package.pt2"))
    times["dense_package"] = time.perf_counter() - start
    return times


def measure(way: str, args: argparse.Namespace, work: Path) -> None:
    """Child process: load or build ``way`` (packages from ``work``), time it at every length; save
    logits and rows to ``--out``."""
    import transformers  # noqa: F401  (imports are not part of the load time)

    import omnicompile
    from omnicompile.recording import recording

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    start = time.perf_counter()
    if way == "compiled":
        run = torch.compile(
            build(args.layers, args.device), backend=omnicompile.backend(sparse_config(args)), dynamic=True
        )
    else:
        run = omnicompile.load_package(work / f"{way}.pt2")
    load_s = time.perf_counter() - start
    rows, logits = [], {}
    for length in args.seq_lens:
        ids = input_ids(length, args.device)
        with torch.no_grad(), recording(measure=False) as recorder:
            sync()
            start = time.perf_counter()
            logits[length] = run(ids).float().cpu()
            sync()
            first_s = time.perf_counter() - start
        times = []
        with torch.no_grad():
            for _ in range(args.reps):
                sync()
                start = time.perf_counter()
                run(ids)
                sync()
                times.append(time.perf_counter() - start)
        decisions = sorted({site_run.decision for site_run in recorder.runs})
        rows.append(
            {
                "way": way,
                "seq_len": length,
                "load_s": load_s,
                "first_call_s": first_s,
                "steady_ms": statistics.median(times) * 1e3,
                "decisions": "+".join(decisions) or "-",
            }
        )
    torch.save(logits, args.out / f"{way}.logits.pt")
    (args.out / f"{way}.json").write_text(json.dumps(rows))


def run_child(way: str, argv: list[str], work: Path, out: Path) -> list[dict]:
    """Run `measure` for ``way`` in a fresh process with empty compiler caches, started with libstdc++
    preloaded (`omnicompile.loading.preload_env`), so that `omnicompile.load_package` needs no
    fresh-process probe, which would count as load time (docs/EXPORT.md, "Loading on CUDA")."""
    from omnicompile.loading import preload_env

    with tempfile.TemporaryDirectory() as cache:
        env = {
            **preload_env(),
            "TRITON_CACHE_DIR": f"{cache}/triton",
            "TORCHINDUCTOR_CACHE_DIR": f"{cache}/inductor",
            "PYTHONUNBUFFERED": "1",
        }
        subprocess.run(
            [sys.executable, __file__, *argv, "--measure", way, "--work", str(work)], check=True, env=env
        )
    rows = json.loads((out / f"{way}.json").read_text())
    print(f"measured {way}: {rows}", flush=True)
    return rows


def check(out: Path, rows: list[dict]) -> tuple[list[str], list[str]]:
    """Correctness lines, and the failures: sparse package vs compiled model, attention run sparse."""
    from omnicompile.metrics import relative_error

    sparse, dense, compiled = (torch.load(out / f"{way}.logits.pt") for way in WAYS)
    lines, failures = [], []
    for length in sparse:
        err = relative_error(sparse[length], compiled[length])
        lines.append(
            f"S={length}: sparse package vs compiled rel err {err:.2e} (tol {BF16_TOL}); "
            f"vs dense package {relative_error(sparse[length], dense[length]):.2e}"
        )
        if err > BF16_TOL:
            failures.append(f"S={length}: rel err {err:.2e}")
    failures += [
        f"S={r['seq_len']}: package attention ran {r['decisions']}, not sparse"
        for r in rows
        if r["way"] == "sparse_package" and r["decisions"] != "sparse"
    ]
    return lines, failures


def print_table(rows: list[dict], export_s: dict[str, float]) -> None:
    header = ["way", "seq_len", "export_s", "load_s", "first_call_s", "steady_ms", "decisions"]
    table = [header] + [
        [
            r["way"],
            str(r["seq_len"]),
            f"{export_s.get(r['way'], float('nan')):.1f}",
            f"{r['load_s']:.2f}",
            f"{r['first_call_s']:.2f}",
            f"{r['steady_ms']:.1f}",
            r["decisions"],
        ]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--example-len", type=int, default=4096, help="sequence length traced at export")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tau", type=float, default=0.95)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--min-seq-len", type=int, default=4096)
    parser.add_argument(
        "--max-blocks", type=int, default=64, help="cap of the shared budget K (random weights)"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("out/bench_export"))
    parser.add_argument("--measure", choices=WAYS, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args, args.work)
        return
    argv = sys.argv[1:]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as packages:
        work = Path(packages)
        export_s = export_packages(args, work)
        print(f"exported: {', '.join(f'{way} {s:.1f} s' for way, s in export_s.items())}", flush=True)
        rows = [row for way in WAYS for row in run_child(way, argv, work, args.out)]
    (args.out / "export_times.json").write_text(json.dumps(export_s))
    with open(args.out / "export.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "export_s"])
        writer.writeheader()
        writer.writerows({**row, "export_s": export_s.get(row["way"], "")} for row in rows)
    lines, failures = check(args.out, rows)
    print("\n".join(lines + [f"FAILED: {failure}" for failure in failures]))
    print_table(rows, export_s)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
