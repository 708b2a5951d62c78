"""Forward-kernel tiles benchmark (GPU; not a test): does the sparse forward get faster with TMA loads
or with 128-token selection blocks (128-row tiles), at the models' shapes?

For each shape (``--shapes``: H/Hkv/D/S, default SmolLM2's 9/3/64 at 32K and 32/8/128 at 64K), preset
(`omnicompile.demos.structured`, plus ``full``: every causal block, the kernel's peak) and selection block
size (``--block-sizes``), the selection of our pipeline (Triton estimator and selection, ``--tau``,
budget scope ``head``) is made once; then every launch config of ``LAUNCHES`` that tiles the block is
timed on it (CUDA events, median), with its TFLOP/s on the computed blocks (4 * D * b^2 a block) and its
largest difference to the first config's output. Per selection also: density, estimate + selection time,
exact recall on ``--recall-heads`` sampled heads (mean / worst), and cuDNN SDPA at that shape. B = 1,
bf16, causal. Writes ``tiles.csv`` and ``tiles.json`` to ``--out``; prints a table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import sys
from pathlib import Path

import torch
from bench_prefill import _pipeline, _recall, dense_sdpa, time_ms, write_csv
from rich.console import Console
from rich.table import Table
from torch.nn.attention import SDPBackend

from omnicompile.config import OmniSparseConfig
from omnicompile.demos.structured import structured_qkv
from omnicompile.kernels.selection.transpose import selection_from_block_mask
from omnicompile.kernels.sparse_attention.launch import LaunchConfig
from omnicompile.kernels.sparse_attention.triton_fwd import sparse_attention
from omnicompile.metrics import density

# (block_m, block_n, num_warps, num_stages, tma); the first that tiles a block size is the baseline.
LAUNCHES = [
    LaunchConfig(64, 64, 4, 3),
    LaunchConfig(64, 64, 4, 3, tma=True),
    LaunchConfig(64, 64, 4, 4, tma=True),
    LaunchConfig(64, 32, 4, 3, tma=True),
    LaunchConfig(128, 64, 8, 2),
    LaunchConfig(128, 64, 8, 3),
    LaunchConfig(128, 64, 8, 2, tma=True),
    LaunchConfig(128, 64, 8, 3, tma=True),
    LaunchConfig(128, 128, 8, 2, tma=True),
]


def _shape(text: str) -> tuple[int, int, int, int]:
    heads, kv_heads, head_dim, seq = (int(x) for x in text.split("/"))
    return heads, kv_heads, head_dim, seq


def run(args, log: Console) -> list[dict]:
    rows = []
    for heads, kv_heads, head_dim, seq in args.shapes:
        for preset in args.presets:
            q, k, v = structured_qkv(
                "mixed" if preset == "full" else preset, 1, heads, kv_heads, seq, head_dim,
                dtype=torch.bfloat16, device="cuda", seed=0,
            )  # fmt: skip
            scale = head_dim**-0.5
            cudnn_fn, _ = dense_sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION)
            cudnn_ms = time_ms(cudnn_fn)
            for block in args.block_sizes:
                config = OmniSparseConfig(tau=args.tau, block_size=block, budget_scope="head")
                parts, selection, allowed = _pipeline(q, k, v, config, scale)
                if preset == "full":
                    selection = selection_from_block_mask(allowed.expand(1, heads, -1, -1), block, seq, seq)
                base = {
                    "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "seq_len": seq,
                    "preset": preset, "block": block, "density": density(selection, allowed),
                    "est_sel_ms": time_ms(parts["estimate"]) + time_ms(parts["select"]),
                    "cudnn_ms": cudnn_ms,
                }  # fmt: skip
                if preset != "full" and args.recall_heads:
                    base.update(_recall(q, k, selection, allowed, scale, args.recall_heads))
                flops = 4 * head_dim * block**2 * selection.kv_num_blocks.sum().item()
                reference = None
                for launch in LAUNCHES:
                    if block % launch.block_m or block % launch.block_n:
                        continue
                    fn = functools.partial(
                        sparse_attention, q, k, v, selection, None, True, scale, launch=launch
                    )
                    out = fn()[0]
                    reference = out if reference is None else reference
                    ms = time_ms(fn)
                    rows.append(
                        {
                            **base,
                            **{f"launch_{key}": val for key, val in dataclasses.asdict(launch).items()},
                            "ms": ms,
                            "tflops": flops / ms / 1e9,
                            "max_abs_diff": (out.float() - reference.float()).abs().max().item(),
                        }
                    )
                    log.print(json.dumps(rows[-1]))
    return rows


def print_table(rows: list[dict], log: Console) -> None:
    table = Table(title="sparse forward by tile (B 1, bf16, causal; ms median of CUDA events)")
    for name in ("H/Hkv/D", "S", "preset", "b", "density", "recall", "est+sel", "tile", "TMA", "ms",
                 "TFLOP/s", "x cuDNN", "max diff"):  # fmt: skip
        table.add_column(name)
    for r in rows:
        tile = f"{r['launch_block_m']}x{r['launch_block_n']}"
        tile += f" w{r['launch_num_warps']} s{r['launch_num_stages']}"
        recall = f"{r['recall_mean']:.3f}/{r['recall_min']:.2f}" if "recall_mean" in r else "-"
        table.add_row(
            f"{r['heads']}/{r['kv_heads']}/{r['head_dim']}", str(r["seq_len"]), r["preset"], str(r["block"]),
            f"{r['density']:.3f}", recall, f"{r['est_sel_ms']:.2f}", tile, "y" if r["launch_tma"] else "",
            f"{r['ms']:.3f}", f"{r['tflops']:.0f}", f"{r['cudnn_ms'] / r['ms']:.2f}",
            f"{r['max_abs_diff']:.1e}",
        )  # fmt: skip
    log.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes", type=_shape, nargs="+", default=[_shape("9/3/64/32768"), _shape("32/8/128/65536")]
    )
    parser.add_argument("--presets", nargs="+", default=["full", "mixed", "structured"])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--tau", type=float, default=0.99)
    parser.add_argument("--recall-heads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("out/bench_fwd_tiles"))
    args = parser.parse_args()
    log = Console(width=200)
    rows = run(args, log)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "tiles.csv", rows)
    meta = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    (args.out / "tiles.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    print_table(rows, log)


if __name__ == "__main__":
    main()
