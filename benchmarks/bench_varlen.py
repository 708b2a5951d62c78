"""Chunked prefill and packed-batch benchmark (GPU; not a test) of `omnicompile.varlen`, one attention
layer (H = 32, Hkv = 8, D = 128, bf16, causal), inputs of `omnicompile.demos.structured` presets.

Chunked prefill: a prompt prefilled in chunks against its growing cache (`prefix_causal_attention` per
chunk) against the one-shot sparse prefill and dense. For each sequence length S, chunk size C, preset:
- one-shot: the op over all S queries (``is_causal=True``), and cuDNN / flash SDPA for reference;
- chunked: S / C calls, chunk j's queries against keys ``0 .. (j + 1) C - 1`` (split at the chunk and
  merged by lse), timed end to end as a serving engine runs it (one chunk after another);
- both also replayed from a CUDA graph (``_graph_ms`` columns: no Python or launch overhead, as under
  ``torch.compile(mode="reduce-overhead")`` or an engine's graph runner);
- output relative error of each against dense (flash, fp32 norms) and of chunked against one-shot.
Target (issue 20): chunked within 1.3x of the one-shot time.

Packed batch: ``--batch-lens`` prompts of mixed lengths packed in one row (`varlen_attention`: the op once
per sequence) against dense attention per sequence (cuDNN and flash SDPA, each sequence causal alone:
what flash-attention's varlen kernel computes, with no work on padding). Target (issue 20): a batch of 8
prompts of 8K-32K >= 2x dense.

Writes ``chunked_prefill.csv`` and ``packed_batch.csv`` to ``--out`` and prints the tables last.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_prefill import graphed, print_rows, time_ms, write_csv
from torch.nn.attention import SDPBackend, sdpa_kernel

from omnicompile.config import OmniSparseConfig
from omnicompile.demos.structured import PRESETS, structured_qkv
from omnicompile.metrics import relative_error
from omnicompile.varlen import prefix_causal_attention, varlen_attention

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DEVICE = "cuda"


def _cell(key: str):
    """A formatter for column ``key`` of `print_rows`: floats to 3 significant digits."""
    return lambda row: f"{row[key]:.3g}" if isinstance(row[key], float) else str(row[key])


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


def _graph_ms(fn) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph; NaN (reason printed) where capture fails."""
    try:
        return time_ms(graphed(fn))
    except RuntimeError as err:
        print(f"CUDA graph capture failed: {str(err).splitlines()[0][:160]}")
        return float("nan")


def _dense(q, k, v, backend: SDPBackend) -> torch.Tensor:
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def run_case(seq_len: int, chunk: int, preset: str, config: OmniSparseConfig) -> dict:
    q, k, v = structured_qkv(
        preset, 1, HEADS, KV_HEADS, seq_len, HEAD_DIM, dtype=torch.bfloat16, device=DEVICE
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
    row["one_shot_graph_ms"] = _graph_ms(lambda: _one_shot(q, k, v, cfg))
    row["chunked_graph_ms"] = _graph_ms(lambda: _chunked(q, k, v, cfg, chunk))
    row["chunked_over_one_shot_graph"] = row["chunked_graph_ms"] / row["one_shot_graph_ms"]
    return row


def run_batch(lengths: list[int], preset: str, config: OmniSparseConfig) -> dict:
    """One packed batch of ``lengths``: each sequence its own structured q/k/v (seeded by its index)."""
    seqs = [
        structured_qkv(preset, 1, HEADS, KV_HEADS, n, HEAD_DIM, dtype=torch.bfloat16, device=DEVICE, seed=i)
        for i, n in enumerate(lengths)
    ]
    q, k, v = (torch.cat([s[i][0].transpose(0, 1) for s in seqs]) for i in range(3))  # [T, H, D]
    cu = torch.tensor([0, *lengths], device=DEVICE).cumsum(0)
    cfg = config.to_json()

    def dense(backend: SDPBackend) -> list[torch.Tensor]:
        return [_dense(sq, sk, sv, backend) for sq, sk, sv in seqs]

    packed = varlen_attention(q, k, v, cu, cu, cfg)
    flash = torch.cat([o[0].transpose(0, 1) for o in dense(SDPBackend.FLASH_ATTENTION)])
    row = {
        "lengths": "/".join(str(n) for n in lengths),
        "preset": preset,
        "tau": config.tau,
        "cudnn_ms": time_ms(lambda: dense(SDPBackend.CUDNN_ATTENTION)),
        "flash_ms": time_ms(lambda: dense(SDPBackend.FLASH_ATTENTION)),
        "packed_ms": time_ms(lambda: varlen_attention(q, k, v, cu, cu, cfg)),
        "packed_err": relative_error(packed, flash),
    }
    row["speedup_vs_cudnn"] = row["cudnn_ms"] / row["packed_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[32768])
    parser.add_argument("--chunks", type=int, nargs="+", default=[4096])
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=["mixed", "structured"])
    parser.add_argument(
        "--batch-lens", type=int, nargs="*", default=[8192, 32768, 12288, 24576, 16384, 8192, 28672, 20480]
    )
    parser.add_argument("--config", default="{}", help="OmniSparseConfig JSON (default: the defaults)")
    parser.add_argument("--out", type=Path, default=Path("out/varlen"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_varlen needs a CUDA GPU")
    config = OmniSparseConfig.from_json(args.config)
    rows = [
        run_case(seq_len, chunk, preset, config)
        for seq_len in args.seq_lens
        for chunk in args.chunks
        for preset in args.presets
    ]
    batches = (
        [run_batch(args.batch_lens, preset, config) for preset in args.presets] if args.batch_lens else []
    )
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "chunked_prefill.csv", rows)
    write_csv(args.out / "packed_batch.csv", batches)
    for title, table in (
        ("chunked prefill vs one-shot", rows),
        ("packed batch vs dense per sequence", batches),
    ):
        if table:
            print_rows(title, {key: _cell(key) for key in table[0]}, table)


if __name__ == "__main__":
    main()
