"""Prefill benchmark (GPU; not a test): OmniSparse Triton kernels against dense SDPA and FlexAttention.

For each sequence length S, KV-head count and input preset (`omnicompile.demos.structured`: ``structured``,
``mixed``, ``mixed_flat``, ``flat_head``, ``random``), with B = 1, causal, bf16:
- dense: torch SDPA with the flash, cuDNN and memory-efficient backends (each alone; a backend that
  refuses GQA is retried on repeated K/V and marked so);
- per estimator and budget scope: our pipeline in parts (Triton estimator, Triton selection,
  Triton sparse attention) and in total, eager and replayed from a CUDA graph (no Python or launch
  overhead: what a compiled model would see), and FlexAttention on the same selection (``--flex-seq-lens``:
  it compiles per shape);
- density (computed / allowed blocks) and its spread over the (b, h) (min / median / max), exact
  recall (`omnicompile.metrics.exact_recall`, on ``--recall-heads`` sampled heads, up to
  ``--recall-max-seq``: it costs an exact fp32 pass) and on the same heads the per-head oracle's
  density at that mean recall (`metrics.oracle_density`; ``x oracle`` = the selection's density on
  those heads / the oracle's), output relative error against dense flash, speed-ups, and our TFLOP/s
  on the computed blocks (4 * D * b^2 per computed block).

``--sweep`` first times launch configurations of the forward, selection, estimator and row probe at
the first S. Writes ``prefill.csv``, ``prefill.json`` (and ``sweep.csv``) and ``prefill.png`` to
``--out``; prints a table last. Stops starting new cases after ``--time-budget-s`` and still writes
what it has.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch.nn.attention import SDPBackend, sdpa_kernel

from omnicompile.config import OmniSparseConfig
from omnicompile.demos.structured import PRESETS, structured_qkv
from omnicompile.kernels.estimation import launch as estimation_launch
from omnicompile.kernels.estimation.triton_composite import estimate_blocks
from omnicompile.kernels.estimation.triton_probe import probe_block_mass
from omnicompile.kernels.masks import allowed_blocks
from omnicompile.kernels.selection import BlockSelection, SelectionCall, triton_select
from omnicompile.kernels.sparse_attention.launch import LaunchConfig
from omnicompile.kernels.sparse_attention.triton_fwd import sparse_attention
from omnicompile.method import estimation_params, select_on_device, selection_params
from omnicompile.metrics import (
    density,
    exact_block_mass,
    exact_recall,
    head_densities,
    oracle_density,
    relative_error,
)

DENSE_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
FWD_SWEEP = [
    LaunchConfig(64, 64, 4, 2),
    LaunchConfig(64, 64, 4, 3),
    LaunchConfig(64, 64, 4, 4),
    LaunchConfig(64, 64, 8, 3),
    LaunchConfig(64, 32, 4, 3),
    LaunchConfig(64, 32, 4, 4),
]
EST_SWEEP = [
    estimation_launch.LaunchConfig(64, 64, 4, 2),
    estimation_launch.LaunchConfig(64, 64, 4, 3),
    estimation_launch.LaunchConfig(64, 64, 8, 2),
    estimation_launch.LaunchConfig(128, 64, 8, 2),
    estimation_launch.LaunchConfig(128, 64, 8, 3),
]
# Row probe: (block_r, split_n, num_warps); the first (16 rows, the default until 2026-12-07) is the
# reference of the others' max_abs_diff.
PROBE_SWEEP = [
    estimation_launch.LaunchConfig(block_r=r, split_n=n, num_warps=w)
    for r, n, w in [(16, 1024, 4), (32, 1024, 4), (64, 1024, 4), (64, 2048, 4), (64, 1024, 8), (128, 2048, 8)]
]

# What `_recall` measures (NaN where it does not run).
RECALL_KEYS = ("recall_mean", "recall_min", "sampled_density", "oracle_density", "x_oracle")
# Warps of the selection's row kernels (None: the default, 16 values a thread).
SELECT_WARPS = [None, 1, 2, 4, 8, 16]


def time_ms(fn: Callable[[], object], target_ms: float = 200.0, max_reps: int = 50) -> float:
    """Median milliseconds of ``fn`` after one warm-up call (CUDA events; host clock on the CPU)."""
    fn()
    reps = max_reps
    times = []
    for _ in range(max_reps):
        if len(times) >= reps:
            break
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        reps = max(3, min(max_reps, math.ceil(target_ms / max(times[0], 1e-3))))
    return statistics.median(times)


def dense_sdpa(q, k, v, backend: SDPBackend) -> tuple[Callable[[], torch.Tensor], str]:
    """A dense causal SDPA call pinned to ``backend``; K/V repeated if the backend refuses GQA."""
    group = q.shape[1] // k.shape[1]

    def native() -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)

    try:
        native()
        return native, ""
    except RuntimeError:
        if group == 1:
            raise
    k_rep, v_rep = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

    def expanded() -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True)

    expanded()
    return expanded, " (K/V repeated)"


def _head_subset(selection: BlockSelection, heads: list[int]) -> BlockSelection:
    index = torch.tensor(heads, device=selection.kv_indices.device)
    fields = {
        f: getattr(selection, f).index_select(1, index)
        for f in ("kv_num_blocks", "kv_indices", "lazy", "budget")
    }
    return dataclasses.replace(selection, **fields)


def _recall(q, k, selection: BlockSelection, allowed, scale: float, num_heads: int) -> dict[str, float]:
    """Exact recall (mean, worst) over ``num_heads`` heads spread over the layer (last one included),
    the selection's density on those heads and the per-head oracle's density at the same mean recall
    (`metrics.oracle_density`); ``allowed``: the pipeline's allowed blocks."""
    heads = sorted({round(i * (q.shape[1] - 1) / max(num_heads - 1, 1)) for i in range(num_heads)})
    group = q.shape[1] // k.shape[1]
    sub_k = k[:, [h // group for h in heads]]  # one KV head per sampled query head
    mass = exact_block_mass(q[:, heads], sub_k, None, True, scale, selection.block_size)
    sampled = _head_subset(selection, heads)
    recall = exact_recall(mass, sampled)
    sub_allowed = allowed if allowed.shape[1] == 1 else allowed[:, heads]
    oracle, _ = oracle_density(mass, sub_allowed, recall.mean().item())
    sampled_density = density(sampled, sub_allowed)
    return {
        "recall_mean": recall.mean().item(),
        "recall_min": recall.min().item(),
        "sampled_density": sampled_density,
        "oracle_density": oracle,
        "x_oracle": sampled_density / max(oracle, 1e-9),
    }


def _flex_runner(q, k, v, selection: BlockSelection, scale: float) -> Callable[[], torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    from omnicompile.kernels.selection.flex import to_block_mask

    block_mask = to_block_mask(selection, is_causal=True)
    compiled = torch.compile(flex_attention, dynamic=False)
    # Flex's H100 default tile (BLOCK_M = 128) does not divide our 64-token blocks.
    tiles = {"BLOCK_M": selection.block_size, "BLOCK_N": selection.block_size}
    return lambda: compiled(
        q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1], kernel_options=tiles
    )


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph (replay without Python or launch overhead)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _pipeline(q, k, v, config: OmniSparseConfig, scale: float):
    """The parts of our prefill, each a zero-argument callable, and their results."""
    batch, heads, seq, _ = q.shape
    allowed = allowed_blocks(None, True, batch, heads, seq, seq, config.block_size, q.device)
    estimation, selecting = estimation_params(config), selection_params(config)
    call = SelectionCall(k.shape[1], True, seq, seq)

    def estimate() -> torch.Tensor:
        return estimate_blocks(q, k, None, True, scale, estimation)

    ahat = estimate()

    def select() -> BlockSelection:
        return select_on_device(ahat, allowed, selecting, call)

    selection = select()

    def attend() -> tuple[torch.Tensor, torch.Tensor]:
        return sparse_attention(q, k, v, selection, None, True, scale)

    def total() -> tuple[torch.Tensor, torch.Tensor]:
        a = estimate_blocks(q, k, None, True, scale, estimation)
        s = select_on_device(a, allowed, selecting, call)
        return sparse_attention(q, k, v, s, None, True, scale)

    return {"estimate": estimate, "select": select, "attend": attend, "total": total}, selection, allowed


def run_case(args, seq: int, kv_heads: int, preset: str, dense_ms: dict, log: Console) -> list[dict]:
    """All rows of one (S, Hkv, preset): one per (estimator, budget scope)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = structured_qkv(
        preset, 1, args.heads, kv_heads, seq, args.head_dim, dtype=dtype, device=device, seed=0
    )
    scale = args.head_dim**-0.5
    dense_key = (seq, kv_heads)
    dense_out = None
    for name, backend in DENSE_BACKENDS.items():
        try:
            fn, note = dense_sdpa(q, k, v, backend)
            if dense_key + (name,) not in dense_ms:
                dense_ms[dense_key + (name,)] = (time_ms(fn), note)
            if dense_out is None:
                dense_out = fn()
        except RuntimeError as err:
            dense_ms[dense_key + (name,)] = (float("nan"), f" n/a: {str(err).splitlines()[0][:80]}")
    rows = []
    for estimator in args.estimators:
        for scope in args.scopes:
            config = OmniSparseConfig(tau=args.tau, estimator=estimator, budget_scope=scope)
            parts, selection, allowed = _pipeline(q, k, v, config, scale)
            ms = {name: time_ms(fn) for name, fn in parts.items()}
            ms["total_graph"] = float("nan")
            if device.type == "cuda":
                try:
                    ms["total_graph"] = time_ms(graphed(parts["total"]))
                except RuntimeError as err:  # e.g. a host synchronisation inside the pipeline
                    log.print(f"CUDA graph capture at S={seq}: {str(err).splitlines()[0][:120]}")
            out, _ = parts["attend"]()
            row = {
                "seq_len": seq,
                "heads": args.heads,
                "kv_heads": kv_heads,
                "head_dim": args.head_dim,
                "preset": preset,
                "estimator": estimator,
                "budget_scope": scope,
                "tau": args.tau,
                **{f"{name}_ms": dense_ms[dense_key + (name,)][0] for name in DENSE_BACKENDS},
                "dense_notes": "; ".join(
                    f"{n}{dense_ms[dense_key + (n,)][1]}"
                    for n in DENSE_BACKENDS
                    if dense_ms[dense_key + (n,)][1]
                ),
                **{f"ours_{name}_ms": value for name, value in ms.items()},
                "density": density(selection, allowed),
                "lazy_fraction": selection.lazy.float().mean().item(),
                "rel_error": relative_error(out, dense_out) if dense_out is not None else float("nan"),
            }
            blocks = selection.kv_num_blocks.sum().item()
            row["ours_attend_tflops"] = (
                4 * args.head_dim * config.block_size**2 * blocks / (ms["attend"] * 1e9)
            )
            row["speedup_total_vs_flash"] = row["flash_ms"] / ms["total"]
            row["speedup_total_vs_cudnn"] = row["cudnn_ms"] / ms["total"]
            row["speedup_attend_vs_flash"] = row["flash_ms"] / ms["attend"]
            row["estimate_share_of_attend"] = ms["estimate"] / ms["attend"]
            row["flex_ms"] = float("nan")
            if seq in args.flex_seq_lens and (estimator, scope) == (args.estimators[0], args.scopes[0]):
                try:
                    row["flex_ms"] = time_ms(_flex_runner(q, k, v, selection, scale))
                except Exception as err:  # noqa: BLE001 - report, never fake, a missing baseline
                    log.print(f"flex at S={seq}: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
            heads = head_densities(selection, allowed).flatten()
            row.update(
                head_density_min=heads.min().item(),
                head_density_median=heads.median().item(),
                head_density_max=heads.max().item(),
            )
            row.update(dict.fromkeys(RECALL_KEYS, float("nan")))
            if args.recall_heads and seq <= args.recall_max_seq:
                row.update(_recall(q, k, selection, allowed, scale, args.recall_heads))
            rows.append(row)
            del parts, selection, out
    return rows


def profile_pipeline(args, log: Console) -> None:
    """Print the CUDA kernel-time breakdown of one whole prefill (estimate, select, attend) per S."""
    from torch.profiler import ProfilerActivity, profile

    for seq in args.seq_lens:
        q, k, v = structured_qkv(
            "structured",
            1,
            args.heads,
            args.kv_heads[0],
            seq,
            args.head_dim,
            dtype=torch.bfloat16,
            device="cuda",
        )
        parts, _, _ = _pipeline(q, k, v, OmniSparseConfig(tau=args.tau), args.head_dim**-0.5)
        parts["total"]()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            parts["total"]()
            torch.cuda.synchronize()
        log.print(f"S={seq} Hkv={args.kv_heads[0]} structured: CUDA kernels of one prefill")
        log.print(
            prof.key_averages().table(
                sort_by="self_device_time_total", row_limit=14, max_name_column_width=70
            )
        )


def sweep(args, log: Console) -> list[dict]:
    """Time each launch config of the forward, the selection's row kernels (its kv_indices equal to the
    default's or not), the composite estimator and the row probe (its output against the default
    config's: max abs diff) on the structured preset at the first S."""
    seq, kv_heads = args.seq_lens[0], args.kv_heads[0]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = structured_qkv(
        "structured", 1, args.heads, kv_heads, seq, args.head_dim, dtype=dtype, device=device
    )
    scale, config = args.head_dim**-0.5, OmniSparseConfig(tau=args.tau)
    _, selection, _ = _pipeline(q, k, v, config, scale)
    rows = []
    for launch in FWD_SWEEP:
        ms = time_ms(
            functools.partial(sparse_attention, q, k, v, selection, None, True, scale, launch=launch)
        )
        rows.append(
            {
                "kernel": "attention",
                "seq_len": seq,
                "kv_heads": kv_heads,
                **dataclasses.asdict(launch),
                "ms": ms,
            }
        )
        log.print(json.dumps(rows[-1]))
    ahat = estimate_blocks(q, k, None, True, scale, estimation_params(config))
    allowed = allowed_blocks(None, True, 1, args.heads, seq, seq, config.block_size, q.device)
    call = SelectionCall(kv_heads, True, seq, seq)
    for warps in SELECT_WARPS:
        run = functools.partial(
            triton_select.select_blocks, ahat, allowed, selection_params(config), call, num_warps=warps
        )
        same = torch.equal(run().kv_indices, selection.kv_indices)
        rows.append(
            {
                "kernel": "select",
                "seq_len": seq,
                "kv_heads": kv_heads,
                "num_warps": warps or "default",
                "ms": time_ms(run),
                "equal": same,
            }
        )
        log.print(json.dumps(rows[-1]))
    for launch in EST_SWEEP:
        ms = time_ms(
            functools.partial(
                estimate_blocks, q, k, None, True, scale, estimation_params(config), launch=launch
            )
        )
        rows.append(
            {
                "kernel": "estimate",
                "seq_len": seq,
                "kv_heads": kv_heads,
                **dataclasses.asdict(launch),
                "ms": ms,
            }
        )
        log.print(json.dumps(rows[-1]))
    reference = probe_block_mass(q, k, None, True, scale, config.block_size, launch=PROBE_SWEEP[0])
    for launch in PROBE_SWEEP:
        run = functools.partial(probe_block_mass, q, k, None, True, scale, config.block_size, launch=launch)
        rows.append(
            {
                "kernel": "probe",
                "seq_len": seq,
                "kv_heads": kv_heads,
                **dataclasses.asdict(launch),
                "ms": time_ms(run),
                "max_abs_diff": (run() - reference).abs().max().item(),
            }
        )
        log.print(json.dumps(rows[-1]))
    return rows


def cell(key: str, spec: str = ".3g") -> Callable[[dict], str]:
    """A `print_rows` column formatter: ``row[key]`` formatted with ``spec``, "-" where the row lacks it."""
    return lambda row: format(row[key], spec) if key in row else "-"


def print_rows(
    title: str, columns: dict[str, Callable[[dict], str]], rows: list[dict], width: int = 200
) -> None:
    """Print ``rows`` as a rich table: one column per header, its cells from the formatter."""
    table = Table(title=title)
    for header in columns:
        table.add_column(header)
    for row in rows:
        table.add_row(*(column(row) for column in columns.values()))
    Console(width=width).print(table)


def write_csv(path: Path, rows: list[dict]) -> None:
    if rows:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
            writer.writeheader()
            writer.writerows(rows)


def _plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["preset"], r["kv_heads"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (preset, kv_heads) in zip(axes[0], panels):
        sub = [r for r in rows if r["preset"] == preset and r["kv_heads"] == kv_heads]
        seqs = sorted({r["seq_len"] for r in sub})
        first = {s: next(r for r in sub if r["seq_len"] == s) for s in seqs}
        for name in DENSE_BACKENDS:
            ax.plot(seqs, [first[s][f"{name}_ms"] for s in seqs], "--", label=f"SDPA {name}")
        for est, scope in sorted({(r["estimator"], r["budget_scope"]) for r in sub}):
            mine = {r["seq_len"]: r for r in sub if (r["estimator"], r["budget_scope"]) == (est, scope)}
            xs = sorted(mine)
            ax.plot(xs, [mine[s]["ours_total_ms"] for s in xs], "o-", label=f"ours {est}/{scope}")
            ax.plot(
                xs,
                [mine[s]["ours_total_graph_ms"] for s in xs],
                "s-",
                label=f"ours {est}/{scope}, CUDA graph",
            )
            ax.plot(xs, [mine[s]["flex_ms"] for s in xs], "x:", label=f"flex {est}/{scope}")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="sequence length",
            ylabel="ms",
            title=f"{preset}, Hkv={kv_heads}",
        )
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _head_spread(row: dict) -> str:
    """The per-(b, h) densities' min / median / max of a row."""
    return "/".join(f"{row[f'head_density_{q}']:.2f}" for q in ("min", "median", "max"))


def _table(rows: list[dict]) -> Table:
    table = Table(title="prefill (B=1, causal): ms, speed-up vs SDPA flash, quality")
    columns = [
        ("S", "seq_len", "{}"),
        ("Hkv", "kv_heads", "{}"),
        ("preset", "preset", "{}"),
        ("est", "estimator", "{}"),
        ("scope", "budget_scope", "{}"),
        ("flash", "flash_ms", "{:.2f}"),
        ("cudnn", "cudnn_ms", "{:.2f}"),
        ("eff", "efficient_ms", "{:.2f}"),
        ("flex", "flex_ms", "{:.2f}"),
        ("est ms", "ours_estimate_ms", "{:.2f}"),
        ("sel ms", "ours_select_ms", "{:.2f}"),
        ("attn ms", "ours_attend_ms", "{:.2f}"),
        ("total", "ours_total_ms", "{:.2f}"),
        ("graph", "ours_total_graph_ms", "{:.2f}"),
        ("x flash", "speedup_total_vs_flash", "{:.2f}"),
        ("x cudnn", "speedup_total_vs_cudnn", "{:.2f}"),
        ("density", "density", "{:.3f}"),
        ("heads min/med/max", None, _head_spread),
        ("oracle", "oracle_density", "{:.3f}"),
        ("x oracle", "x_oracle", "{:.2f}"),
        ("recall", "recall_mean", "{:.3f}"),
        ("worst", "recall_min", "{:.3f}"),
        ("rel err", "rel_error", "{:.1e}"),
        ("TFLOP/s", "ours_attend_tflops", "{:.0f}"),
    ]
    for title, _, _ in columns:
        table.add_column(title, justify="right")
    for row in rows:
        table.add_row(*[fmt(row) if callable(fmt) else fmt.format(row[key]) for _, key, fmt in columns])
    return table


def main() -> None:
    warnings.filterwarnings("ignore", message=".*(kernel not used because|runtime disabled|same num_heads).*")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[8])
    parser.add_argument(
        "--presets", nargs="+", choices=PRESETS, default=["structured", "mixed", "mixed_flat", "random"]
    )
    parser.add_argument("--estimators", nargs="+", default=["composite"])
    parser.add_argument("--scopes", nargs="+", default=["heads"])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tau", type=float, default=0.95)
    parser.add_argument("--flex-seq-lens", type=int, nargs="*", default=[32768])
    parser.add_argument("--recall-heads", type=int, default=2, help="heads sampled for exact recall (0: off)")
    parser.add_argument("--recall-max-seq", type=int, default=32768)
    parser.add_argument("--sweep", action="store_true", help="time launch configs first")
    parser.add_argument(
        "--profile", action="store_true", help="kernel-time breakdown of one prefill per S first"
    )
    parser.add_argument("--time-budget-s", type=float, default=480.0)
    parser.add_argument("--out", type=Path, default=Path("out/bench_prefill"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = Console(width=240)
    started = time.monotonic()
    if torch.cuda.is_available():
        log.print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__}")
    if args.sweep:
        write_csv(args.out / "sweep.csv", sweep(args, log))
    if args.profile:
        profile_pipeline(args, log)
    cases = [(s, h, p) for s in args.seq_lens for h in args.kv_heads for p in args.presets]
    rows: list[dict] = []
    dense_ms: dict = {}
    with Progress(console=log) as progress:
        task = progress.add_task("prefill cases", total=len(cases))
        for seq, kv_heads, preset in cases:
            if time.monotonic() - started > args.time_budget_s:
                log.print(f"time budget reached: skipped S={seq} Hkv={kv_heads} {preset} and later cases")
                break
            progress.update(task, description=f"S={seq} Hkv={kv_heads} {preset}")
            try:
                rows += run_case(args, seq, kv_heads, preset, dense_ms, log)
            except torch.OutOfMemoryError as err:
                log.print(
                    f"S={seq} Hkv={kv_heads} {preset}: out of memory ({str(err).splitlines()[0][:100]})"
                )
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            progress.advance(task)
            write_csv(args.out / "prefill.csv", rows)
    (args.out / "prefill.json").write_text(json.dumps(rows, indent=1))
    if rows:
        _plot(args.out / "prefill.png", rows)
        log.print(_table(rows))


if __name__ == "__main__":
    main()
