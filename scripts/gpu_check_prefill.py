"""One-command GPU correctness check of the Triton prefill kernels at realistic sizes.

    python scripts/gpu_check_prefill.py [--out DIR]

Checks, each against an independent computation on the same inputs:
- sparse attention forward vs ``sparse_attention_reference`` (fp32 math) for real selections (estimate +
  select on structured inputs) and random ones: causal and not, GQA, partial blocks, Sq != Skv, bool and
  additive masks, head dims 64 / 96 / 128, bf16 / fp16; output memory pre-poisoned with NaN;
- tau = 1 without query selection: the pipeline selects every allowed block and equals dense SDPA;
- the fused estimator vs the reference estimator (Ahat error, and whether selecting from either gives
  the same blocks);
- the fused Triton selection vs ``select_blocks`` on the same estimate (rows with identical blocks;
  float32 sums may move a need by one block where the mass lands within rounding of tau).
Prints one line per check and a summary; exits 1 if any check fails. Writes ``gpu_check.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from omnicompile.config import OmniSparseConfig
from omnicompile.demos.structured import structured_qkv
from omnicompile.kernels.estimation.reference import estimate_blocks as reference_estimate
from omnicompile.kernels.estimation.triton_composite import estimate_blocks
from omnicompile.kernels.masks import allowed_blocks
from omnicompile.kernels.selection.block_selection import BlockSelection
from omnicompile.kernels.selection.select import select_blocks
from omnicompile.kernels.selection.transpose import selection_from_block_mask
from omnicompile.kernels.selection.triton_select import select_blocks_triton
from omnicompile.kernels.sparse_attention.reference import sparse_attention_reference
from omnicompile.kernels.sparse_attention.triton_fwd import sparse_attention_fwd
from omnicompile.metrics import relative_error

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
OUT_TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}
LSE_ATOL = 1e-3
AHAT_TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _select(q, k, is_causal: bool, config: OmniSparseConfig, ahat: torch.Tensor) -> BlockSelection:
    batch, heads, q_len, _ = q.shape
    allowed = allowed_blocks(None, is_causal, batch, heads, q_len, k.shape[2], config.block_size, q.device)
    return select_blocks(
        ahat, allowed, config, k.shape[1], is_causal=is_causal, q_len=q_len, kv_len=k.shape[2]
    )


def _poison() -> None:
    """Fill the caching allocator's free memory with NaN so an unwritten output shows."""
    if DEVICE.type == "cuda":
        torch.full((int(torch.cuda.mem_get_info()[0] * 0.5) // 4,), float("nan"), device=DEVICE)


def check_forward(name, q, k, v, selection, attn_mask, is_causal) -> dict:
    _poison()
    out, lse = sparse_attention_fwd(q, k, v, selection, attn_mask, is_causal, None)
    ref_out, ref_lse = sparse_attention_reference(q, k, v, selection, attn_mask, is_causal, None)
    empty = torch.isneginf(ref_lse)
    lse_err = (lse - ref_lse)[~empty].abs().max().item() if (~empty).any() else 0.0
    err = relative_error(out, ref_out)
    ok = (
        err < OUT_TOL[q.dtype]
        and lse_err < LSE_ATOL
        and torch.equal(torch.isneginf(lse), empty)
        and bool((out[empty] == 0).all())
        and not out.isnan().any().item()
    )
    return {"check": name, "rel_error": err, "lse_max_abs": lse_err, "empty_rows": int(empty.sum()), "ok": ok}


def _random_selection(batch, heads, q_len, kv_len, density, gen) -> BlockSelection:
    nq, nk = -(-q_len // 64), -(-kv_len // 64)
    mask = torch.rand(batch, heads, nq, nk, generator=gen, device=DEVICE) < density
    return selection_from_block_mask(mask, 64, q_len, kv_len)


def forward_checks(shrink: int) -> list[dict]:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    results = []
    config = OmniSparseConfig()
    for seq, heads, kv_heads in ((4096 // shrink, 8, 2), (32768 // shrink, 32, 8)):
        q, k, v = structured_qkv(
            "structured", 1, heads, kv_heads, seq, 128, dtype=torch.bfloat16, device=DEVICE
        )
        selection = _select(q, k, True, config, estimate_blocks(q, k, None, True, 128**-0.5, config))
        results.append(
            check_forward(
                f"fwd real selection S={seq} H={heads}/{kv_heads} causal", q, k, v, selection, None, True
            )
        )
    for dtype, head_dim, is_causal, q_len, kv_len in (
        (torch.float16, 64, False, 3000, 4000),
        (torch.bfloat16, 96, True, 4000, 3000),
        (torch.float16, 128, True, 1000, 1000),
        (torch.bfloat16, 128, False, 2500, 2500),
    ):
        q_len, kv_len = q_len // shrink, kv_len // shrink
        q = torch.randn(2, 8, q_len, head_dim, device=DEVICE, generator=gen).to(dtype)
        k = torch.randn(2, 2, kv_len, head_dim, device=DEVICE, generator=gen).to(dtype)
        v = torch.randn(2, 2, kv_len, head_dim, device=DEVICE, generator=gen).to(dtype)
        selection = _random_selection(2, 8, q_len, kv_len, 0.3, gen)
        name = f"fwd random selection {dtype} D={head_dim} causal={is_causal} Sq={q_len} Skv={kv_len}"
        results.append(check_forward(name, q, k, v, selection, None, is_causal))
    seq = 1500 // shrink
    q = torch.randn(1, 4, seq, 128, device=DEVICE, generator=gen).bfloat16()
    k = torch.randn(1, 2, seq, 128, device=DEVICE, generator=gen).bfloat16()
    v = torch.randn(1, 2, seq, 128, device=DEVICE, generator=gen).bfloat16()
    selection = _random_selection(1, 4, seq, seq, 0.5, gen)
    bool_mask = torch.rand(1, 4, seq, seq, device=DEVICE, generator=gen) < 0.5
    bool_mask[0, 1, 7] = False
    results.append(check_forward("fwd bool mask", q, k, v, selection, bool_mask, False))
    additive = torch.randn(seq, seq, device=DEVICE, generator=gen).bfloat16()
    results.append(check_forward("fwd additive mask", q, k, v, selection, additive, False))
    return results


def dense_equality_checks(shrink: int) -> list[dict]:
    results = []
    config = OmniSparseConfig(tau=1.0, query_selection=False)
    for seq, heads, kv_heads in ((4000 // shrink, 8, 2), (32768 // shrink, 32, 8)):
        q, k, v = structured_qkv(
            "structured", 1, heads, kv_heads, seq, 128, dtype=torch.bfloat16, device=DEVICE
        )
        ahat = estimate_blocks(q, k, None, True, 128**-0.5, config)
        selection = _select(q, k, True, config, ahat)
        allowed = allowed_blocks(None, True, 1, heads, seq, seq, 64, DEVICE)
        full = torch.equal(selection.dense_mask(), allowed.expand_as(ahat))
        out, _ = sparse_attention_fwd(q, k, v, selection, None, True, None)
        err = relative_error(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        ok = full and err < OUT_TOL[torch.bfloat16]
        results.append(
            {
                "check": f"tau=1 equals dense SDPA S={seq}",
                "all_allowed_selected": full,
                "rel_error": err,
                "ok": ok,
            }
        )
    return results


def estimator_checks(shrink: int) -> list[dict]:
    results = []
    for estimator, seq, is_causal, preset in (
        ("composite", 8192, True, "structured"),
        ("composite", 5000, False, "structured"),
        ("pooled", 8192, True, "structured"),
        ("composite", 8192, True, "random"),
    ):
        config = OmniSparseConfig(estimator=estimator)
        seq = seq // shrink
        q, k, _ = structured_qkv(preset, 1, 8, 2, seq, 128, dtype=torch.bfloat16, device=DEVICE, seed=1)
        ahat = estimate_blocks(q, k, None, is_causal, 128**-0.5, config)
        ref = reference_estimate(q, k, None, is_causal, 128**-0.5, config)
        mine, theirs = _select(q, k, is_causal, config, ahat), _select(q, k, is_causal, config, ref)
        same = (mine.dense_mask() == theirs.dense_mask()).all(-1).float().mean().item()
        err = relative_error(ahat, ref)
        results.append(
            {
                "check": f"estimator {estimator} {preset} S={seq} causal={is_causal}",
                "ahat_rel_error": err,
                "ahat_max_abs": (ahat - ref).abs().max().item(),
                "rows_with_same_selection": same,
                "ok": err < AHAT_TOL[torch.bfloat16],
            }
        )
    return results


def selection_checks(shrink: int) -> list[dict]:
    results = []
    for seq, is_causal, scope in ((32768, True, "heads"), (32768, True, "head"), (12000, False, "kv_group")):
        config = OmniSparseConfig(budget_scope=scope)
        seq = seq // shrink
        q, k, _ = structured_qkv(
            "structured", 1, 32, 8, seq, 128, dtype=torch.bfloat16, device=DEVICE, seed=2
        )
        ahat = estimate_blocks(q, k, None, is_causal, None, config)
        allowed = allowed_blocks(None, is_causal, 1, 32, seq, seq, config.block_size, q.device)
        ref = select_blocks(ahat, allowed, config, 8, is_causal=is_causal, q_len=seq, kv_len=seq)
        _poison()
        fused = select_blocks_triton(ahat, allowed, config, 8, is_causal=is_causal, q_len=seq, kv_len=seq)
        same_rows = (fused.dense_mask() == ref.dense_mask()).all(-1).float().mean().item()
        count_diff = (fused.kv_num_blocks - ref.kv_num_blocks).abs().max().item()
        results.append(
            {
                "check": f"fused selection S={seq} causal={is_causal} scope={scope}",
                "rows_identical": same_rows,
                "max_count_difference": count_diff,
                "lazy_equal": bool((fused.lazy == ref.lazy).all()),
                "ok": same_rows > 0.999 and count_diff <= 1,
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--shrink", type=int, default=1, help="divide every length by this (CPU dry runs)")
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu (TRITON_INTERPRET=1 dry run)"
    print(f"device: {device} | torch {torch.__version__}", flush=True)
    results = []
    for group in (forward_checks, dense_equality_checks, estimator_checks, selection_checks):
        try:
            rows = group(args.shrink)
        except Exception as err:  # noqa: BLE001 - a crash is a failed check, reported with the rest
            rows = [{"check": group.__name__, "error": f"{type(err).__name__}: {err}", "ok": False}]
        for row in rows:
            print(json.dumps(row), flush=True)
        results += rows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    failed = [r["check"] for r in results if not r["ok"]]
    print(
        f"{len(results) - len(failed)}/{len(results)} checks passed"
        + (f"; FAILED: {failed}" if failed else "")
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
