"""Chunked prefill benchmark (GPU; not a test): a prompt prefilled in chunks against its growing cache
(`omnicompile.varlen.prefix_causal_attention` per chunk) against the one-shot sparse prefill and dense.

For each sequence length S, chunk size C and input preset (`omnicompile.demos.structured`), one
attention layer (B = 1, H = 32, Hkv = 8, D = 128, bf16, causal):
- one-shot: the op over all S queries (``is_causal=True``), and cuDNN / flash SDPA for reference;
- chunked: S / C calls, chunk j's queries against keys ``0 .. (j + 1) C - 1`` (split at the chunk and
  merged by lse), timed end to end as a serving engine runs it (one chunk after another);
- output relative error of each against dense (flash, fp32 norms) and of chunked against one-shot.
Target (issue 20): chunked within 1.3x of the one-shot time. Writes ``chunked_prefill.csv`` to
``--out`` and prints a table last.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_prefill import _write_csv, print_rows, time_ms
from torch.nn.attention import SDPBackend, sdpa_kernel

from omnicompile.config import OmniSparseConfig
from omnicompile.demos.structured import PRESETS, structured_qkv
from omnicompile.metrics import relative_error
from omnicompile.varlen import prefix_causal_attention

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def _one_shot(q, k, v, config: str) -> torch.Tensor:
    return torch.ops.omnisparse.attention(
        q, k, v, None, 0.0, True, None, True, config, "one_shot", need_lse=False
    )[0]


def _chunked(q, k, v, config: str, chunk: int) -> torch.Tensor:
    seq_len = q.shape[2]
    return torch.cat(
        [
            prefix_causal_attention(
                q[:, :, s : s + chunk], k[:, :, : s + chunk], v[:, :, : s + chunk], config
            )
            for s in range(0, seq_len, chunk)
        ],
        2,
    )


def _dense(q, k, v, backend: SDPBackend) -> torch.Tensor:
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def run_case(seq_len: int, chunk: int, preset: str, config: OmniSparseConfig) -> dict:
    q, k, v = structured_qkv(
        preset, 1, HEADS, KV_HEADS, seq_len, HEAD_DIM, dtype=torch.bfloat16, device="cuda"
    )
    cfg = config.to_json()
    flash = _dense(q, k, v, SDPBackend.FLASH_ATTENTION)
    one_shot, chunked = _one_shot(q, k, v, cfg), _chunked(q, k, v, cfg, chunk)
    row = {
        "seq_len": seq_len,
        "chunk": chunk,
        "preset": preset,
        "tau": config.tau,
        "cudnn_ms": time_ms(lambda: _dense(q, k, v, SDPBackend.CUDNN_ATTENTION)),
        "flash_ms": time_ms(lambda: _dense(q, k, v, SDPBackend.FLASH_ATTENTION)),
        "one_shot_ms": time_ms(lambda: _one_shot(q, k, v, cfg)),
        "chunked_ms": time_ms(lambda: _chunked(q, k, v, cfg, chunk)),
        "one_shot_err": relative_error(one_shot, flash),
        "chunked_err": relative_error(chunked, flash),
        "chunked_vs_one_shot_err": relative_error(chunked, one_shot),
    }
    row["chunked_over_one_shot"] = row["chunked_ms"] / row["one_shot_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[32768])
    parser.add_argument("--chunks", type=int, nargs="+", default=[4096])
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=["mixed", "structured"])
    parser.add_argument("--config", default="{}", help="OmniSparseConfig JSON (default: the defaults)")
    parser.add_argument("--out", type=Path, default=Path("out/chunked_prefill"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_chunked_prefill needs a CUDA GPU")
    config = OmniSparseConfig.from_json(args.config)
    rows = [
        run_case(seq_len, chunk, preset, config)
        for seq_len in args.seq_lens
        for chunk in args.chunks
        for preset in args.presets
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    _write_csv(args.out / "chunked_prefill.csv", rows)
    print_rows(rows, "chunked prefill vs one-shot (ms, relative error vs flash)")


if __name__ == "__main__":
    main()
