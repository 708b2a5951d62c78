"""Backward benchmark (GPU; not a test): OmniSparse Triton backward against SDPA and FlexAttention.

For each sequence length S on the ``structured`` preset (`omnicompile.demos.structured`), B = 1, causal,
bf16, the OmniSparse selection of the default config (tau 0.95; Triton estimator + select_blocks)
is made once, then timed (median ms, CUDA events):
- ours: Triton forward, Triton backward (given out and lse), and forward + backward; the backward's
  split by kernel (torch profiler, one call);
- dense SDPA forward + backward pinned to flash and to cuDNN (``bwd`` = fwd+bwd - fwd);
- FlexAttention forward + backward and forward alone (``bwd`` = the difference) with the same
  block mask (full blocks below the diagonal, causal mask_mod on the diagonal), at
  ``--flex-seq-lens``: it compiles per shape, with max-autotune (minutes), since its default sm90
  backward tiles do not divide 64-token blocks.
Backward TFLOP/s counts 10 * D * b^2 per selected block (FlashAttention's 2.5 x forward).

Checks (``--check``, relative Frobenius errors, printed and in the CSV): ours against the float32
reference's autograd on one GQA group at the first S; ours against FlexAttention's gradients where
Flex runs; ours with the full causal selection against SDPA flash gradients at the first S (METHOD
invariant 4). ``--sweep`` times backward `LaunchConfig` variants at the first S.

Writes ``backward.csv`` (and ``sweep.csv``, ``checks.csv``) to ``--out``; prints a table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_prefill import time_ms, write_csv
from rich.console import Console
from rich.table import Table
from torch.nn.attention import SDPBackend, sdpa_kernel

from omnicompile.config import OmniSparseConfig
from omnicompile.demos.structured import structured_qkv
from omnicompile.kernels.estimation.triton_composite import estimate_blocks
from omnicompile.kernels.masks import allowed_blocks
from omnicompile.kernels.selection import SelectionCall, select_blocks
from omnicompile.kernels.selection.block_selection import BlockSelection
from omnicompile.kernels.selection.transpose import block_mask_to_indices, selection_from_block_mask
from omnicompile.kernels.sparse_attention import reference, triton_bwd, triton_fwd
from omnicompile.kernels.sparse_attention.launch import LaunchConfig
from omnicompile.method import estimation_params, selection_params
from omnicompile.metrics import density, relative_error

DENSE = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
SWEEP = [
    LaunchConfig(),
    LaunchConfig(dkdv_chunk=None),
    LaunchConfig(dkdv_chunk=32),
    LaunchConfig(num_stages=2),
    LaunchConfig(dq_block_n=64, dkdv_block_m=64, num_warps=8, num_stages=2),
    LaunchConfig(dq_block_n=16, dkdv_block_m=16),
]


def make_selection(q, k, config: OmniSparseConfig) -> BlockSelection:
    """The OmniSparse selection of (q, k) for causal attention."""
    batch, heads, seq, dim = q.shape
    ahat = estimate_blocks(q, k, None, True, dim**-0.5, estimation_params(config))
    allowed = allowed_blocks(None, True, batch, heads, seq, seq, config.block_size, q.device)
    return select_blocks(ahat, allowed, selection_params(config), SelectionCall(k.shape[1], True, seq, seq))


def flex_block_mask(selection: BlockSelection):
    """FlexAttention BlockMask taking the selection's blocks: full below the diagonal, causal on it."""
    from torch.nn.attention.flex_attention import BlockMask

    chosen = selection.dense_mask()
    nq, nk = chosen.shape[-2:]
    below = torch.arange(nk, device=chosen.device)[None, :] < torch.arange(nq, device=chosen.device)[:, None]
    partial_num, partial_idx = block_mask_to_indices(chosen & ~below)
    full_num, full_idx = block_mask_to_indices(chosen & below)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return BlockMask.from_kv_blocks(
        partial_num,
        partial_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=selection.block_size,
        mask_mod=causal,
        seq_lengths=(selection.q_len, selection.kv_len),
    )


def _leaves(q, k, v):
    return [t.detach().clone().requires_grad_() for t in (q, k, v)]


def dense_fwd_bwd(q, k, v, grad_out, backend: SDPBackend) -> Callable[[], tuple]:
    """SDPA forward + backward pinned to ``backend`` (GQA through enable_gqa)."""
    leaves = _leaves(q, k, v)

    def run() -> tuple:
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        return torch.autograd.grad(out, leaves, grad_out)

    return run


def dense_fwd(q, k, v, backend: SDPBackend) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1]
            )

    return run


def flex_runners(
    q, k, v, grad_out, selection: BlockSelection
) -> tuple[Callable[[], tuple], Callable[[], torch.Tensor]]:
    """FlexAttention with the selection's block mask: (forward + backward, forward alone)."""
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = flex_block_mask(selection)
    # On sm90 with D = 128, Flex's default tiles (128) do not divide 64-token blocks: its forward
    # takes tile options, its backward finds 64-wide tiles only among the max-autotune configs.
    compiled = torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")
    leaves = _leaves(q, k, v)
    options = {"BLOCK_M": selection.block_size, "BLOCK_N": selection.block_size}

    def forward(*inputs: torch.Tensor) -> torch.Tensor:
        return compiled(
            *inputs, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1], kernel_options=options
        )

    def fwd_bwd() -> tuple:
        return torch.autograd.grad(forward(*leaves), leaves, grad_out)

    def fwd() -> torch.Tensor:
        with torch.no_grad():
            return forward(q, k, v)

    return fwd_bwd, fwd


def ours_bwd_split(grad_out, q, k, v, out, lse, selection: BlockSelection) -> dict[str, float]:
    """Device ms per kernel of one backward call (torch profiler), keyed by kernel family."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        triton_bwd.sparse_attention_backward(grad_out, q, k, v, out, lse, selection, None, True, None)
        torch.cuda.synchronize()
    split: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key
        family = next(
            (f for f in ("dkdv_kernel", "dq_kernel", "_preprocess") if f in name),
            "other (transpose, casts)",
        )
        split[family] = split.get(family, 0.0) + event.device_time_total / 1e3
    return split


def _group_reference_grads(q, k, v, grad_out, selection: BlockSelection):
    """float32 reference gradients of query heads 0..G-1 and KV head 0 (one GQA group)."""
    group = q.shape[1] // k.shape[1]
    heads = slice(0, group)
    sub = dataclasses.replace(
        selection,
        **{f: getattr(selection, f)[:, heads] for f in ("kv_num_blocks", "kv_indices", "lazy", "budget")},
    )
    leaves = [
        q[:, heads].float().requires_grad_(),
        k[:, :1].float().requires_grad_(),
        v[:, :1].float().requires_grad_(),
    ]
    out, _ = reference.sparse_attention(*leaves, sub, None, True, None)
    return torch.autograd.grad(out, leaves, grad_out[:, heads].float())


def run_checks(q, k, v, grad_out, selection: BlockSelection, log: Console) -> list[dict]:
    """Gradient errors of ours against the reference (one group) and, full selection, dense flash."""
    out, lse = triton_fwd.sparse_attention(q, k, v, selection, None, True, None)
    dq, dk, dv = triton_bwd.sparse_attention_backward(
        grad_out, q, k, v, out, lse, selection, None, True, None
    )
    group = q.shape[1] // k.shape[1]
    want = _group_reference_grads(q, k, v, grad_out, selection)
    rows = [
        {
            "check": "vs fp32 reference (group 0)",
            "seq_len": q.shape[2],
            **{
                f"d{n}": relative_error(g, w)
                for n, g, w in zip("qkv", (dq[:, :group], dk[:, :1], dv[:, :1]), want)
            },
        }
    ]
    seq, block = q.shape[2], selection.block_size
    allowed = allowed_blocks(None, True, 1, q.shape[1], seq, seq, block, q.device).expand(
        1, q.shape[1], -1, -1
    )
    full = selection_from_block_mask(allowed, block, seq, seq)
    out, lse = triton_fwd.sparse_attention(q, k, v, full, None, True, None)
    grads = triton_bwd.sparse_attention_backward(grad_out, q, k, v, out, lse, full, None, True, None)
    dense = dense_fwd_bwd(q, k, v, grad_out, SDPBackend.FLASH_ATTENTION)()
    rows.append(
        {
            "check": "full selection vs SDPA flash",
            "seq_len": seq,
            **{f"d{n}": relative_error(g, w) for n, g, w in zip("qkv", grads, dense)},
        }
    )
    for row in rows:
        log.print(row)
    return rows


def run_case(args, seq: int, log: Console) -> tuple[dict, list[dict]]:
    """Timings of one S, and the gradient checks made there."""
    q, k, v = structured_qkv(
        "structured",
        1,
        args.heads,
        args.kv_heads,
        seq,
        args.head_dim,
        dtype=torch.bfloat16,
        device="cuda",
        seed=0,
    )
    grad_out = torch.randn_like(q)
    config = OmniSparseConfig(tau=args.tau)
    selection = make_selection(q, k, config)
    allowed = allowed_blocks(None, True, 1, args.heads, seq, seq, config.block_size, q.device)
    out, lse = triton_fwd.sparse_attention(q, k, v, selection, None, True, None)
    row = {
        "seq_len": seq,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "density": density(selection, allowed),
    }
    row["ours_fwd_ms"] = time_ms(lambda: triton_fwd.sparse_attention(q, k, v, selection, None, True, None))
    row["ours_bwd_ms"] = time_ms(
        lambda: triton_bwd.sparse_attention_backward(grad_out, q, k, v, out, lse, selection, None, True, None)
    )
    row["ours_fwd_bwd_ms"] = row["ours_fwd_ms"] + row["ours_bwd_ms"]
    blocks = selection.kv_num_blocks.sum().item()
    row["ours_bwd_tflops"] = 10 * args.head_dim * config.block_size**2 * blocks / (row["ours_bwd_ms"] * 1e9)
    row.update(
        {f"ours_bwd_{k_}_ms": v_ for k_, v_ in ours_bwd_split(grad_out, q, k, v, out, lse, selection).items()}
    )
    for name, backend in DENSE.items():
        try:
            row[f"{name}_fwd_bwd_ms"] = time_ms(dense_fwd_bwd(q, k, v, grad_out, backend))
            row[f"{name}_bwd_ms"] = row[f"{name}_fwd_bwd_ms"] - time_ms(dense_fwd(q, k, v, backend))
        except RuntimeError as err:
            log.print(f"SDPA {name} at S={seq}: {str(err).splitlines()[0][:120]}")
            row[f"{name}_fwd_bwd_ms"] = row[f"{name}_bwd_ms"] = float("nan")
    for key in ("flex_fwd_bwd_ms", "flex_bwd_ms", "flex_dq_err", "flex_dk_err", "flex_dv_err"):
        row[key] = float("nan")
    if seq in args.flex_seq_lens:
        try:
            flex, flex_fwd = flex_runners(q, k, v, grad_out, selection)
            row["flex_fwd_bwd_ms"] = time_ms(flex)
            row["flex_bwd_ms"] = row["flex_fwd_bwd_ms"] - time_ms(flex_fwd)
            ours = triton_bwd.sparse_attention_backward(
                grad_out, q, k, v, out, lse, selection, None, True, None
            )
            for n, g, w in zip("qkv", ours, flex()):
                row[f"flex_d{n}_err"] = relative_error(g, w)
        except Exception as err:  # noqa: BLE001 - report, never fake, a missing baseline
            log.print(f"flex at S={seq}: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
    row["speedup_bwd_vs_flash"] = row["flash_bwd_ms"] / row["ours_bwd_ms"]
    row["speedup_fwd_bwd_vs_flash"] = row["flash_fwd_bwd_ms"] / row["ours_fwd_bwd_ms"]
    row["speedup_bwd_vs_flex"] = row["flex_bwd_ms"] / row["ours_bwd_ms"]
    checks = run_checks(q, k, v, grad_out, selection, log) if args.check and seq == args.seq_lens[0] else []
    log.print(row)
    return row, checks


def sweep(args, log: Console) -> list[dict]:
    """Backward ms of each backward `LaunchConfig` variant at the first S."""
    seq = args.seq_lens[0]
    q, k, v = structured_qkv(
        "structured",
        1,
        args.heads,
        args.kv_heads,
        seq,
        args.head_dim,
        dtype=torch.bfloat16,
        device="cuda",
        seed=0,
    )
    grad_out = torch.randn_like(q)
    selection = make_selection(q, k, OmniSparseConfig(tau=args.tau))
    out, lse = triton_fwd.sparse_attention(q, k, v, selection, None, True, None)
    rows = []
    for tiles in SWEEP:
        ms = time_ms(
            lambda t=tiles: triton_bwd.sparse_attention_backward(
                grad_out, q, k, v, out, lse, selection, None, True, None, launch=t
            )
        )
        rows.append({"seq_len": seq, **dataclasses.asdict(tiles), "bwd_ms": ms})
        log.print(rows[-1])
    return rows


def _table(rows: list[dict]) -> Table:
    table = Table(title="backward (B=1, causal, bf16, structured preset): ms")
    columns = [
        ("S", "seq_len", "{}"),
        ("density", "density", "{:.3f}"),
        ("ours fwd", "ours_fwd_ms", "{:.2f}"),
        ("ours bwd", "ours_bwd_ms", "{:.2f}"),
        ("dq", "ours_bwd_dq_kernel_ms", "{:.2f}"),
        ("dkdv", "ours_bwd_dkdv_kernel_ms", "{:.2f}"),
        ("ours f+b", "ours_fwd_bwd_ms", "{:.2f}"),
        ("flash bwd", "flash_bwd_ms", "{:.2f}"),
        ("flash f+b", "flash_fwd_bwd_ms", "{:.2f}"),
        ("cudnn f+b", "cudnn_fwd_bwd_ms", "{:.2f}"),
        ("flex bwd", "flex_bwd_ms", "{:.2f}"),
        ("flex f+b", "flex_fwd_bwd_ms", "{:.2f}"),
        ("x flash bwd", "speedup_bwd_vs_flash", "{:.2f}"),
        ("x flash f+b", "speedup_fwd_bwd_vs_flash", "{:.2f}"),
        ("x flex bwd", "speedup_bwd_vs_flex", "{:.2f}"),
        ("bwd TFLOP/s", "ours_bwd_tflops", "{:.0f}"),
        ("dq err vs flex", "flex_dq_err", "{:.1e}"),
    ]
    for title, _, _ in columns:
        table.add_column(title, justify="right")
    for row in rows:
        table.add_row(*[fmt.format(row.get(key, float("nan"))) for _, key, fmt in columns])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tau", type=float, default=0.95)
    parser.add_argument("--flex-seq-lens", type=int, nargs="*", default=[16384, 32768, 65536])
    parser.add_argument("--check", action="store_true", help="gradient checks at the first S")
    parser.add_argument(
        "--sweep", action="store_true", help="time backward LaunchConfig variants at the first S"
    )
    parser.add_argument("--time-budget-s", type=float, default=480.0)
    parser.add_argument("--out", type=Path, default=Path("out/bench_backward"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = Console(width=200)
    started = time.monotonic()
    log.print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__}")
    rows: list[dict] = []
    checks: list[dict] = []
    for seq in args.seq_lens:
        if time.monotonic() - started > args.time_budget_s:
            log.print(f"time budget reached: skipped S={seq} and longer")
            break
        try:
            row, found = run_case(args, seq, log)
            rows.append(row)
            checks += found
        except torch.OutOfMemoryError as err:
            log.print(f"S={seq}: out of memory ({str(err).splitlines()[0][:100]})")
        torch.cuda.empty_cache()
        write_csv(args.out / "backward.csv", rows)
        write_csv(args.out / "checks.csv", checks)
    if args.sweep and time.monotonic() - started < args.time_budget_s:
        write_csv(args.out / "sweep.csv", sweep(args, log))
    log.print(_table(rows))


if __name__ == "__main__":
    main()
