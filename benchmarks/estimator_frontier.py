"""Estimators against the exact per-head oracle: density / recall frontier (issue 16; not a test).

For each input (structured presets, or the q / k of a pretrained model's layers on real text) and each
estimator variant x tau x budget scope, the reference pipeline (``estimate_blocks`` + ``select_blocks``,
CPU or GPU) gives a selection; against the exact block mass (``metrics.exact_block_mass``) it reports:
- density (computed / allowed blocks) and mean exact recall (mass on the selected blocks, mean over
  (head, query block));
- the oracle's density at the same mean recall: per (b, h, i), the fewest blocks in descending exact
  mass whose mass reaches a threshold t, t found by bisection so the oracle's mean recall equals the
  estimator's (the best any selection of whole blocks could do with that recall);
- ratio = density / oracle density (issue 16's target: <= 1.3), and the share of (h, i) below 0.9.

    python estimator_frontier.py --inputs mixed mixed_flat --seq-len 8192          # presets
    python estimator_frontier.py --inputs smollm2-135m --seq-len 4096 --layers 0 7 15 23 29
Prints a table last; writes ``frontier.json`` / ``frontier.csv`` to ``--out``. Run from ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from bench_prefill import print_rows, write_csv

from omnicompile.config import OmniSparseConfig
from omnicompile.demos.structured import PRESETS, structured_qkv
from omnicompile.kernels.estimation import estimate_blocks
from omnicompile.kernels.masks import allowed_blocks
from omnicompile.kernels.selection import SelectionCall, select_blocks
from omnicompile.method import estimation_params, selection_params
from omnicompile.metrics import exact_block_mass, exact_recall, oracle_density

VARIANTS: dict[str, dict] = {
    "composite": {"row_probe": False},
    "composite+probe": {},
    "composite g8+probe": {"granularity": 8},
    "antidiagonal+probe": {"estimator": "antidiagonal"},
    "pooled+probe": {"estimator": "pooled"},
}


def preset_inputs(names: list[str], seq_len: int, device: str) -> Iterator[tuple[str, tuple]]:
    """(label, (q, k, scale)) per preset: 8 query heads / 2 KV heads, D = 64, fp32."""
    for name in names:
        q, k, _ = structured_qkv(name, 1, 8, 2, seq_len, 64, dtype=torch.float32, device=device)
        yield name, (q, k, 64**-0.5)


def model_inputs(name: str, seq_len: int, layers: list[int], device: str) -> Iterator[tuple[str, tuple]]:
    """(label, (q, k, scale)) of the chosen layers of a pretrained model on real text (fp32).

    q / k are captured after RoPE through transformers' attention interface; a sliding-window layer is
    skipped (its selection is the exact band, see `ops.dense_reason`)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from omnicompile.demos.models import load_pretrained
    from omnicompile.evaluate import document_ids

    model, tokenizer = load_pretrained(name, dtype=torch.float32, device=device)
    captured: dict[int, tuple] = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        layer = getattr(module, "layer_idx", -1)
        if layer in layers and kwargs.get("sliding_window") is None:
            captured[layer] = (query.detach(), key.detach(), kwargs.get("scaling"))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("omni_capture", capture)
    AttentionMaskInterface.register("omni_capture", sdpa_mask)
    model.set_attn_implementation("omni_capture")
    with torch.no_grad():
        model(document_ids(tokenizer, seq_len).to(device), use_cache=False, logits_to_keep=1)
    for layer in sorted(captured):
        yield f"{name} L{layer}", captured[layer]


def evaluate_input(label: str, q, k, scale, args: argparse.Namespace) -> list[dict]:
    """One row per (variant, tau, scope) on one input."""
    base = OmniSparseConfig(block_size=args.block_size, min_seq_len=1)
    heads, kv_heads, seq = q.shape[1], k.shape[1], q.shape[2]
    mass = exact_block_mass(q, k, None, True, scale, args.block_size)
    allowed = allowed_blocks(None, True, 1, heads, seq, seq, args.block_size, q.device)
    rows = []
    for variant in args.variants:
        ahat = estimate_blocks(q, k, None, True, scale, estimation_params(base.replace(**VARIANTS[variant])))
        for tau in args.taus:
            for scope in args.scopes:
                config = base.replace(tau=tau, budget_scope=scope, **VARIANTS[variant])
                selection = select_blocks(
                    ahat, allowed, selection_params(config), SelectionCall(kv_heads, True, seq, seq)
                )
                chosen = selection.dense_mask()
                recall = exact_recall(mass, selection)
                dens = (chosen.sum() / allowed.expand(chosen.shape).sum()).item()
                oracle, _ = oracle_density(mass, allowed, recall.mean().item())
                rows.append(
                    {
                        "input": label,
                        "variant": variant,
                        "tau": tau,
                        "scope": scope,
                        "density": dens,
                        "recall": recall.mean().item(),
                        "low_recall": (recall < 0.9).float().mean().item(),
                        "oracle_density": oracle,
                        "ratio": dens / max(oracle, 1e-9),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


COLUMNS = {
    "input": lambda r: r["input"],
    "variant": lambda r: r["variant"],
    "tau": lambda r: f"{r['tau']:.2f}",
    "scope": lambda r: r["scope"],
    "density": lambda r: f"{r['density']:.3f}",
    "recall": lambda r: f"{r['recall']:.3f}",
    "rows < 0.9": lambda r: f"{r['low_recall']:.3f}",
    "oracle": lambda r: f"{r['oracle_density']:.3f}",
    "x oracle": lambda r: f"{r['ratio']:.2f}",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", nargs="+", default=["mixed", "mixed_flat"], help="presets or models")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 7, 15, 23, 29], help="model layers")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--taus", type=float, nargs="+", default=[0.9, 0.95])
    parser.add_argument("--scopes", nargs="+", default=["heads", "kv_group", "head"])
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("out/estimator_frontier"))
    args = parser.parse_args()
    rows = []
    for name in args.inputs:
        source = (
            preset_inputs([name], args.seq_len, args.device)
            if name in PRESETS
            else model_inputs(name, args.seq_len, args.layers, args.device)
        )
        for label, (q, k, scale) in source:
            rows += evaluate_input(label, q, k, scale, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frontier.json").write_text(json.dumps(rows, indent=1))
    write_csv(args.out / "frontier.csv", rows)
    print_rows("estimators against the per-head oracle (density at equal mean recall)", COLUMNS, rows)


if __name__ == "__main__":
    main()
