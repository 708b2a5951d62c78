"""Decode speed through transformers' ``generate`` on a pretrained model, dense vs slim cache (GPU; not a
test; ``--smoke`` runs tiny sizes on the CPU).

One model (`bench_models.load_for_length`: SmolLM2-135M by default, bf16 on CUDA, RoPE scaled with YaRN
past its 8192 positions), B = 1, for each prompt length S a prompt of natural-language text
(`omnicompile.evaluate.document_ids`), greedy decoding of ``--new`` tokens with four caches:
- ``dense``: `DynamicCache` + SDPA, eager (``disable_compile=True``);
- ``dense-graphs``: transformers' `StaticCache` + SDPA: ``generate`` compiles the decode step itself
  (``torch.compile(mode="reduce-overhead")``, Inductor's CUDA graphs), transformers' fast path;
- ``slim``: `SlimKVCache` (growing tail) + ``attn_implementation="omnisparse_decode"``, eager;
- ``slim-graphs``: ``SlimKVCache(..., decode_capacity=new)`` (static tail), compiled by ``generate`` as
  ``dense-graphs``.
Reported per variant: decode tokens/s (1 / the median time between consecutive tokens after the first
``--skip``, from a streamer's clock; ``generate`` syncs once per token anyway), the time to the first
token (the prefill), the KV bytes the cache holds (from its tensors: a static cache's whole capacity),
and the generated tokens against ``dense``'s and, for a compiled variant, against its eager twin's
(fraction equal, first position that differs). Each variant runs one untimed ``generate`` first
(Triton and Inductor compilation, CUDA-graph recording) and reports how long it took. The compiled
variants use generate's compile config with ``dynamic=True``: one compilation per variant serves every
length (with generate's default ``dynamic=None`` the second length compiles again, ~85 s each for SmolLM2
on an H100; ``--static-shapes`` does that).

Run from ``benchmarks/`` (it imports ``bench_models``); prints a table last and writes
``generate.json`` / ``generate.csv`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_models import load_for_length
from bench_prefill import cell, print_rows, write_csv
from transformers import CompileConfig, DynamicCache, StaticCache
from transformers.generation.streamers import BaseStreamer

from omnicompile.config import OmniSparseConfig
from omnicompile.evaluate import document_ids
from omnicompile.hf_cache import ATTN_IMPLEMENTATION, SlimKVCache
from omnicompile.kernels.decode.slim_kv import storage_bytes

VARIANTS = ("dense", "dense-graphs", "slim", "slim-graphs")


class _Clock(BaseStreamer):
    """Host times at which ``generate`` hands over the prompt and then each new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _cache(variant: str, model, config: OmniSparseConfig, seq_len: int, new: int):
    if variant == "dense":
        return DynamicCache(config=model.config)
    if variant == "dense-graphs":
        return StaticCache(config=model.config, max_cache_len=seq_len + new)
    return SlimKVCache(model.config, config, decode_capacity=new if variant == "slim-graphs" else None)


def _cache_bytes(cache) -> int:
    if isinstance(cache, SlimKVCache):
        return cache.stored_bytes()
    return storage_bytes(*[t for layer in cache.layers for t in (layer.keys, layer.values)])


def _generate(model, ids: torch.Tensor, cache, new: int, compile_config: CompileConfig | None, clock=None):
    """Greedy tokens [new] of ``ids`` [1, S]; ``compile_config`` None: eager."""
    out = model.generate(  # the mask given: a token equal to pad_token_id is not padding
        ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=new,
        min_new_tokens=new, do_sample=False, pad_token_id=0, streamer=clock,
        disable_compile=compile_config is None, compile_config=compile_config,
    )  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def run_variant(
    model, ids: torch.Tensor, variant: str, config: OmniSparseConfig, new: int, skip: int,
    compile_config: CompileConfig,
) -> dict:  # fmt: skip
    """One row: ``variant`` generating ``new`` tokens after ``ids`` [1, S]."""
    seq_len = ids.shape[1]
    model.set_attn_implementation("sdpa" if variant.startswith("dense") else ATTN_IMPLEMENTATION)
    graphs = compile_config if variant.endswith("graphs") else None
    row = {"seq_len": seq_len, "variant": variant, "new_tokens": new}
    start = time.perf_counter()  # compile and record first, untimed
    _generate(model, ids, _cache(variant, model, config, seq_len, new), new, graphs)
    row["warmup_s"] = time.perf_counter() - start
    cache, clock = _cache(variant, model, config, seq_len, new), _Clock()
    tokens = _generate(model, ids, cache, new, graphs, clock)
    gaps = [b - a for a, b in zip(clock.times[1:], clock.times[2:])][skip:]  # after the first token
    step_s = statistics.median(gaps)
    row.update(
        tokens_per_s=1.0 / step_s,
        step_ms=step_s * 1e3,
        first_token_ms=(clock.times[1] - clock.times[0]) * 1e3,
        kv_bytes=_cache_bytes(cache),
        tokens=tokens,
    )
    return row


def _match(tokens: list[int], reference: list[int]) -> tuple[float, int]:
    """(fraction of positions equal, first position that differs or -1)."""
    equal = [a == b for a, b in zip(tokens, reference)]
    return sum(equal) / len(equal), equal.index(False) if not all(equal) else -1


def compare(rows: list[dict]) -> None:
    """Add, per row, the speed and bytes relative to ``dense`` (and ``dense-graphs``) at its length and
    how its tokens match ``dense``'s (and a compiled variant's those of its eager twin)."""
    for row in rows:
        peers = {r["variant"]: r for r in rows if r["seq_len"] == row["seq_len"]}
        dense = peers["dense"]
        row["match"], row["first_diff"] = _match(row["tokens"], dense["tokens"])
        twin = peers.get(row["variant"].removesuffix("-graphs"))
        if row["variant"].endswith("-graphs") and twin is not None:
            row["match_eager"], row["first_diff_eager"] = _match(row["tokens"], twin["tokens"])
        row["x_dense"] = row["tokens_per_s"] / dense["tokens_per_s"]
        if "dense-graphs" in peers:
            row["x_dense_graphs"] = row["tokens_per_s"] / peers["dense-graphs"]["tokens_per_s"]
        row["kv_ratio"] = dense["kv_bytes"] / row["kv_bytes"]


COLUMNS = {
    "S": cell("seq_len", "d"),
    "variant": cell("variant", "s"),
    "tokens/s": cell("tokens_per_s", ".1f"),
    "ms/token": cell("step_ms", ".2f"),
    "x dense": cell("x_dense", ".2f"),
    "x dense-graphs": cell("x_dense_graphs", ".2f"),
    "first token ms": cell("first_token_ms", ".0f"),
    "KV MB": lambda row: f"{row['kv_bytes'] / 2**20:.1f}",
    "dense KV / KV": cell("kv_ratio", ".1f"),
    "tokens = dense": lambda row: f"{row['match']:.3f} (first diff {row['first_diff']})",
    "tokens = eager": lambda row: (
        f"{row['match_eager']:.3f} (first diff {row['first_diff_eager']})" if "match_eager" in row else "-"
    ),
    "warm-up s": cell("warmup_s", ".1f"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--new", type=int, default=128, help="tokens generated per run")
    parser.add_argument("--skip", type=int, default=4, help="decode steps left out of the median")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument(
        "--static-shapes", action="store_true", help="compile with generate's default dynamic=None"
    )
    parser.add_argument("--tau-decode", type=float, default=OmniSparseConfig.tau_decode)
    parser.add_argument("--head-mass-eps", type=float, default=OmniSparseConfig.head_mass_eps)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CPU check: prompts of 512 tokens, 12 new, slimming from 256 tokens, compiled with aot_eager",
    )
    parser.add_argument("--out", type=Path, default=Path("out/bench_generate"))
    args = parser.parse_args()
    config = OmniSparseConfig(tau_decode=args.tau_decode, head_mass_eps=args.head_mass_eps)
    dynamic = None if args.static_shapes else True
    compile_config = CompileConfig(dynamic=dynamic)  # else generate's default: inductor, "reduce-overhead"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.seq_lens, args.new = [512], 12
        config = config.replace(min_seq_len=256, recent_window=64, obs_window=32)
        compile_config = CompileConfig(backend="aot_eager", mode="default", dynamic=dynamic)
        compile_config._compile_all_devices = True  # generate compiles on accelerators only
    if "dense" not in args.variants:
        args.variants = ["dense", *args.variants]  # the reference of every comparison
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, tokenizer = load_for_length(args.model, max(args.seq_lens) + args.new + 1, device=device)
    print(
        f"device: {torch.cuda.get_device_name() if device == 'cuda' else device}; model {args.model} "
        f"{next(model.parameters()).dtype}; config: {config.to_json()}"
    )
    rows = []
    for seq_len in args.seq_lens:
        ids = document_ids(tokenizer, seq_len).to(device)
        for variant in args.variants:
            with torch.no_grad():
                rows.append(run_variant(model, ids, variant, config, args.new, args.skip, compile_config))
            print(f"  S={seq_len} {variant}: {rows[-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    compare(rows)
    (args.out / "generate.json").write_text(json.dumps(rows, indent=1))
    write_csv(args.out / "generate.csv", [{k: v for k, v in r.items() if k != "tokens"} for r in rows])
    print(f"written to {args.out}/ in {time.perf_counter() - start:.0f} s")
    print_rows(f"generate, {args.model}, {args.new} new tokens", COLUMNS, rows)


if __name__ == "__main__":
    main()
