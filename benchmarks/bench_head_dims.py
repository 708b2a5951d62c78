"""Timings of the Triton prefill forward at the served models' head dims, with and without a window (GPU;
not a test: the same cases' correctness is tests/gpu/test_kernels.py).

    python benchmarks/bench_head_dims.py [--seq-lens 8192 32768] [--out DIR]

For D = 64 (H 9, Hkv 3: SmolLM2), 128 (9 / 3) and 256 (4 / 1: Gemma 3), window None and 512, bf16,
B = 1, structured inputs, selection = fused estimator + `select_on_device` (default config): density,
and ms of the fused row probe (`triton_probe`) and `reference.probe_block_mass`, the whole estimate (fused
estimator + probe), our forward and estimate + select + forward, the band forward (every allowed
block), cuDNN and flash SDPA (is_causal, no window: what eager runs for a global layer), and for a
window SDPA with the materialised mask and FlexAttention with a sliding-window block mask.
Prints one line per case and the table last; writes ``bench_head_dims.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_prefill import dense_sdpa, time_ms
from torch.nn.attention import SDPBackend

from omnicompile.config import OmniSparseConfig
from omnicompile.demos.structured import structured_qkv
from omnicompile.kernels.estimation import reference as estimation_reference
from omnicompile.kernels.estimation import triton_probe
from omnicompile.kernels.estimation.triton_composite import estimate_blocks
from omnicompile.kernels.masks import allowed_blocks, window_mask
from omnicompile.kernels.selection import SelectionCall
from omnicompile.kernels.selection.transpose import selection_from_block_mask
from omnicompile.kernels.sparse_attention.triton_fwd import sparse_attention
from omnicompile.method import estimation_params, select_on_device, selection_params
from omnicompile.metrics import density

SHAPES = [(64, 9, 3), (128, 9, 3), (256, 4, 1)]  # head dim, query heads, KV heads
WINDOWS = [None, 512]


def _timed(make) -> float:
    """Median ms of the runner ``make()`` builds, or NaN where the backend refuses these inputs."""
    try:
        fn = make()
        return time_ms(fn)
    except Exception as err:  # noqa: BLE001 (e.g. no cuDNN / flash kernel for this D, flex missing)
        print(f"    skipped: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
        return float("nan")


def _flex(q, k, v, window: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def sliding(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    seq = q.shape[2]
    block_mask = create_block_mask(sliding, None, None, seq, seq, device=q.device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def run_case(
    head_dim: int, heads: int, kv_heads: int, seq: int, window: int | None, device: str = "cuda"
) -> dict:
    config = OmniSparseConfig()
    b = config.block_size
    q, k, v = structured_qkv(
        "structured", 1, heads, kv_heads, seq, head_dim, dtype=torch.bfloat16, device=device
    )
    allowed = allowed_blocks(None, True, 1, heads, seq, seq, b, q.device, window=window)

    def pipeline():
        ahat = estimate_blocks(q, k, None, True, None, estimation_params(config), window=window)
        return select_on_device(
            ahat, allowed, selection_params(config), SelectionCall(kv_heads, True, seq, seq)
        )

    selection = pipeline()
    band = selection_from_block_mask(allowed.expand(1, heads, -1, -1).contiguous(), b, seq, seq)
    scale = head_dim**-0.5
    row = {
        "D": head_dim,
        "H": f"{heads}/{kv_heads}",
        "S": seq,
        "window": window or "-",
        "density": density(selection, allowed),
        "probe_ms": time_ms(lambda: triton_probe.probe_block_mass(q, k, None, True, scale, b, window=window)),
        "probe_torch_ms": time_ms(
            lambda: estimation_reference.probe_block_mass(q, k, None, True, scale, b, window=window)
        ),
        "estimate_ms": time_ms(
            lambda: estimate_blocks(q, k, None, True, None, estimation_params(config), window=window)
        ),
        "ours_fwd": time_ms(lambda: sparse_attention(q, k, v, selection, None, True, None, window=window)),
        "ours_total": time_ms(lambda: sparse_attention(q, k, v, pipeline(), None, True, None, window=window)),
        "band_fwd": time_ms(lambda: sparse_attention(q, k, v, band, None, True, None, window=window)),
        "cudnn": _timed(lambda: dense_sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION)[0]),
        "flash": _timed(lambda: dense_sdpa(q, k, v, SDPBackend.FLASH_ATTENTION)[0]),
        "sdpa_mask": float("nan"),
        "flex": float("nan"),
    }
    if window is not None:
        mask = window_mask(seq, seq, window, q.device)
        row["sdpa_mask"] = _timed(
            lambda: lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        )
        row["flex"] = _timed(lambda: _flex(q, k, v, window))
    return row


def _cell(x) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(_cell(r[c]) for c in cols) + " |" for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    print(torch.cuda.get_device_name(), torch.__version__)
    rows = []
    for head_dim, heads, kv_heads in SHAPES:
        for seq in args.seq_lens:
            for window in WINDOWS:
                rows.append(run_case(head_dim, heads, kv_heads, seq, window))
                print(
                    {key: (round(val, 4) if isinstance(val, float) else val) for key, val in rows[-1].items()}
                )
                torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_head_dims.json").write_text(json.dumps(rows, indent=1))
    print("\ntimes in ms (CUDA-event medians)\n" + _table(rows))


if __name__ == "__main__":
    main()
