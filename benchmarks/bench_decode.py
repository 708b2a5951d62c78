"""Decode benchmark of the slim KV cache (METHOD.md section 4) against a dense cache. GPU; not a test.

Two workloads, each at several prompt lengths S:
- ``structured``: one attention layer's q/k/v from `omnicompile.demos.structured` (sinks, local windows,
  slashes, stripes, needles) for S prompt tokens plus ``--steps`` decode tokens. The layer is slimmed from
  its last prompt queries, the decode tokens are appended, and decode attention runs on the slim cache
  (split-K Triton kernel) and on the dense K/V (SDPA). Reported: stored bytes (from the tensors and from
  the allocator), the latency of one decode step (n = 1: wall clock per call, and replayed from a CUDA
  graph, which removes Python and launch overhead as serving stacks do), the relative error of the decode
  outputs and the observed recall (exact dense attention mass of the decode queries on the kept tokens,
  mean and worst).
- ``model``: a Llama-architecture model built from a config (random weights, so attention is nearly flat
  and slimming keeps most tokens: the structured workload shows the method's regime). Prefill, then
  ``--steps`` greedy decode steps teacher-forced on the dense run's tokens, with DynamicCache + SDPA and
  with SlimKVCache + ``attn_implementation="omnisparse_decode"``. Reported: cache bytes, allocator bytes
  after the prefill, the decode peak, the median step latency, top-1 agreement and logits error.
- ``pretrained``: the same on real weights (``--pretrained``, `omnicompile.demos.models.load_pretrained`) and
  real text (`omnicompile.evaluate.document_ids`), plus a passkey grid (``--depths`` needles,
  `omnicompile.evaluate.passkey_prompt`) decoded from each cache: found (greedy decoding reproduces the
  key, checked teacher-forced) and the key's log-probability, dense cache vs slim cache.

Writes ``structured.csv``, ``model.csv`` and ``pretrained.csv`` to ``--out`` and prints a table last.
kvpress is not installed on the GPU image; the script says whether it found it and never fakes a
comparison.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from omnicompile.config import OmniSparseConfig
from omnicompile.demos.structured import structured_qkv
from omnicompile.hf_cache import ATTN_IMPLEMENTATION, SlimKVCache, slim_decode
from omnicompile.kernels.decode.slim_kv import SlimKV, storage_bytes
from omnicompile.metrics import relative_error
from omnicompile.slimming import slim

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3-8B attention shapes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 20) -> float:
    """Median wall time of ``fn`` in milliseconds (synchronised around every call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _graph_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Mean time of ``fn`` replayed from a CUDA graph (no Python or launch overhead), in
    milliseconds; NaN off CUDA. Serving stacks capture decode steps this way."""
    if device.type != "cuda":
        return float("nan")
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=100)


def bench_structured(seq_len: int, steps: int, config: OmniSparseConfig, device: torch.device) -> dict:
    """One attention layer of structured q/k/v: slim vs dense decode."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = structured_qkv(
        "structured", 1, HEADS, KV_HEADS, seq_len + steps, HEAD_DIM, dtype=dtype, device=device
    )
    scale = HEAD_DIM**-0.5
    plan = slim(q[:, :, :seq_len], k[:, :, :seq_len], config, scale)
    base = _allocated(device)
    kv = SlimKV.pack(k[:, :, :seq_len], v[:, :, :seq_len], plan.keep).append(
        k[:, :, seq_len:], v[:, :, seq_len:]
    )
    slim_allocated = _allocated(device) - base

    q_decode = q[:, :, seq_len:]  # the decode tokens' queries, causal among themselves
    visible = torch.ones(steps, seq_len + steps, dtype=torch.bool, device=device).tril(diagonal=seq_len)
    dense_out = F.scaled_dot_product_attention(
        q_decode, k, v, attn_mask=visible, scale=scale, enable_gqa=True
    )
    slim_out, _ = slim_decode(q_decode, kv, scale)

    group = HEADS // KV_HEADS
    kept = torch.cat([plan.keep, plan.keep.new_ones(1, KV_HEADS, steps)], dim=-1).repeat_interleave(
        group, dim=1
    )
    scores = (q_decode.float() @ k.float().repeat_interleave(group, dim=1).transpose(-1, -2)) * scale
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    recall = (probs * kept[:, :, None, :]).sum(-1)  # [1, H, steps]

    q_step = q_decode[:, :, -1:]
    _reset_peak(device)
    before = _allocated(device)
    slim_ms = _median_ms(lambda: slim_decode(q_step, kv, scale), device)
    slim_step_peak = _peak(device) - before
    _reset_peak(device)
    dense_ms = _median_ms(
        lambda: F.scaled_dot_product_attention(q_step, k, v, scale=scale, enable_gqa=True), device
    )
    dense_step_peak = _peak(device) - before
    slim_graph_ms = _graph_ms(lambda: slim_decode(q_step, kv, scale), device)
    dense_graph_ms = _graph_ms(
        lambda: F.scaled_dot_product_attention(q_step, k, v, scale=scale, enable_gqa=True), device
    )
    dense_bytes = storage_bytes(k, v)
    return {
        "workload": "structured",
        "seq_len": seq_len,
        "dense_bytes": dense_bytes,
        "slim_bytes": kv.stored_bytes(),
        "slim_allocated": slim_allocated,
        "memory_ratio": dense_bytes / kv.stored_bytes(),
        "local_heads": int(plan.local_heads.sum()),
        "dense_step_ms": dense_ms,
        "slim_step_ms": slim_ms,
        "speedup": dense_ms / slim_ms,
        "dense_graph_ms": dense_graph_ms,
        "slim_graph_ms": slim_graph_ms,
        "graph_speedup": dense_graph_ms / slim_graph_ms,
        "dense_step_peak": dense_step_peak,
        "slim_step_peak": slim_step_peak,
        "out_rel_err": relative_error(slim_out, dense_out),
        "recall_mean": recall.mean().item(),
        "recall_min": recall.min().item(),
    }


def _decode_run(model, ids: torch.Tensor, cache, attn: str, steps: int, forced: list[int] | None) -> dict:
    """Prefill then ``steps`` greedy steps (teacher-forced on ``forced`` when given)."""
    device = ids.device
    model.set_attn_implementation(attn)
    _sync(device)
    base = _allocated(device)
    with torch.no_grad():
        logits = [model(ids, past_key_values=cache, logits_to_keep=1).logits[0, -1].float().cpu()]
        _sync(device)
        after_prefill = _allocated(device) - base
        _reset_peak(device)
        step_ms = []
        for step in range(steps):
            token = forced[step] if forced is not None else int(logits[-1].argmax())
            _sync(device)
            start = time.perf_counter()
            out = model(torch.tensor([[token]], device=device), past_key_values=cache, logits_to_keep=1)
            _sync(device)
            step_ms.append((time.perf_counter() - start) * 1e3)
            logits.append(out.logits[0, -1].float().cpu())
    return {
        "logits": torch.stack(logits),
        "tokens": [int(row.argmax()) for row in logits[:-1]],
        "after_prefill": after_prefill,
        "decode_peak": _peak(device) - base,
        "step_ms": statistics.median(step_ms[3:] or step_ms),  # the first steps compile kernels
    }


def _cache_bytes(cache: DynamicCache) -> int:
    return storage_bytes(*[t for layer in cache.layers for t in (layer.keys, layer.values)])


def bench_model(
    model, seq_len: int, steps: int, config: OmniSparseConfig, ids: torch.Tensor | None = None
) -> dict:
    """DynamicCache + SDPA against SlimKVCache + omnisparse_decode on prompt ``ids`` [1, S] (random
    tokens when None)."""
    device = next(model.parameters()).device
    if ids is None:
        ids = torch.randint(0, model.config.vocab_size, (1, seq_len), device=device)
    dense_cache = DynamicCache(config=model.config)
    dense = _decode_run(model, ids, dense_cache, "sdpa", steps, forced=None)
    dense_bytes = _cache_bytes(dense_cache)
    del dense_cache
    slim_cache = SlimKVCache(model.config, config)
    slimmed = _decode_run(model, ids, slim_cache, ATTN_IMPLEMENTATION, steps, forced=dense["tokens"])
    slim_bytes = slim_cache.stored_bytes()
    local = [layer.local_heads.float().mean().item() for layer in slim_cache.slimming() if layer is not None]
    decoded, reference = (
        slimmed["logits"][1:],
        dense["logits"][1:],
    )  # the prefill logits are SDPA in both runs
    agreement = (decoded.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return {
        "workload": "model",
        "seq_len": seq_len,
        "dense_bytes": dense_bytes,
        "slim_bytes": slim_bytes,
        "memory_ratio": dense_bytes / slim_bytes,
        "dense_after_prefill": dense["after_prefill"],
        "slim_after_prefill": slimmed["after_prefill"],
        "dense_decode_peak": dense["decode_peak"],
        "slim_decode_peak": slimmed["decode_peak"],
        "local_head_fraction": statistics.mean(local) if local else float("nan"),
        "dense_step_ms": dense["step_ms"],
        "slim_step_ms": slimmed["step_ms"],
        "speedup": dense["step_ms"] / slimmed["step_ms"],
        "top1_agreement": agreement,
        "logits_rel_err": relative_error(decoded, reference),
    }


def passkey_decode(model, ids: torch.Tensor, answer: torch.Tensor, cache, attn: str) -> dict:
    """Prefill ids [1, S] minus the answer's A tokens into ``cache``, then decode the answer teacher-forced:
    ``found`` (every greedy token is the answer's) and ``logprob`` (of the answer)."""
    model.set_attn_implementation(attn)
    logprob, found = 0.0, True
    with torch.no_grad():
        logits = model(ids[:, : -answer.shape[0]], past_key_values=cache, logits_to_keep=1).logits[0, -1]
        for i, token in enumerate(answer.tolist()):
            log_probs = logits.float().log_softmax(-1)
            logprob += log_probs[token].item()
            found &= int(log_probs.argmax()) == token
            if i + 1 < answer.shape[0]:
                logits = model(answer[None, i : i + 1], past_key_values=cache, logits_to_keep=1).logits[0, -1]
    return {"found": found, "logprob": logprob}


def bench_pretrained(
    name: str, seq_len: int, steps: int, depths: int, config: OmniSparseConfig
) -> list[dict]:
    """Slim vs dense cache on pretrained ``name`` at ``seq_len``.

    One `bench_model` row, one row per passkey.
    """
    from bench_models import load_for_length

    from omnicompile.evaluate import document_ids, passkey_depths, passkey_prompt

    model, tokenizer = load_for_length(
        name, seq_len + steps + 1, device="cuda" if torch.cuda.is_available() else "cpu"
    )
    device = next(model.parameters()).device
    row = bench_model(model, seq_len, steps, config, ids=document_ids(tokenizer, seq_len).to(device))
    rows = [{**row, "workload": "pretrained", "model": name}]
    keys = torch.randint(10000, 100000, (depths,), generator=torch.Generator().manual_seed(0))
    for depth, key in zip(passkey_depths(depths), keys.tolist()):
        ids, answer = (t.to(device) for t in passkey_prompt(tokenizer, seq_len, depth, key))
        dense_cache, slim_cache = DynamicCache(config=model.config), SlimKVCache(model.config, config)
        dense = passkey_decode(model, ids, answer, dense_cache, "sdpa")
        slimmed = passkey_decode(model, ids, answer, slim_cache, ATTN_IMPLEMENTATION)
        rows.append(
            {
                "workload": "passkey",
                "model": name,
                "seq_len": seq_len,
                "depth": depth,
                "dense_found": dense["found"],
                "slim_found": slimmed["found"],
                "dense_logprob": dense["logprob"],
                "slim_logprob": slimmed["logprob"],
                "memory_ratio": _cache_bytes(dense_cache) / slim_cache.stored_bytes(),
            }
        )
    del model
    return rows


def _write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)


def _print_table(rows: list[dict]) -> None:
    columns = ["workload", "seq_len", "memory_ratio", "dense_step_ms", "slim_step_ms", "speedup"]
    extra = [
        "model",
        "dense_graph_ms",
        "slim_graph_ms",
        "graph_speedup",
        "recall_mean",
        "recall_min",
        "out_rel_err",
        "top1_agreement",
        "logits_rel_err",
        "depth",
        "dense_found",
        "slim_found",
        "dense_logprob",
        "slim_logprob",
    ]
    columns += [c for c in extra if any(c in row for row in rows)]
    cells = [
        [f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in columns]
        for row in rows
    ]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(x.rjust(w) for x, w in zip(r, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--steps", type=int, default=32, help="decode steps (>= 4)")
    parser.add_argument("--layers", type=int, default=8, help="layers of the Llama-3-8B-shaped model")
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=["structured", "model", "pretrained"],
        default=["structured", "model"],
    )
    parser.add_argument("--pretrained", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--depths", type=int, default=10, help="passkeys per length (pretrained workload)")
    parser.add_argument("--tau-decode", type=float, default=OmniSparseConfig.tau_decode)
    parser.add_argument("--head-mass-eps", type=float, default=OmniSparseConfig.head_mass_eps)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("out/bench_decode"))
    args = parser.parse_args()
    device = torch.device(args.device)
    config = OmniSparseConfig(tau_decode=args.tau_decode, head_mass_eps=args.head_mass_eps)
    args.out.mkdir(parents=True, exist_ok=True)
    print(
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}; "
        f"config: {config.to_json()}"
    )
    print(
        "kvpress: "
        + (
            "installed, but not compared here"
            if importlib.util.find_spec("kvpress")
            else "not installed, no comparison"
        )
    )

    rows: list[dict] = []
    if "structured" in args.workloads:
        structured = [bench_structured(s, args.steps, config, device) for s in args.seq_lens]
        _write_csv(structured, args.out / "structured.csv")
        rows += structured
    if "model" in args.workloads:
        model_config = LlamaConfig(
            vocab_size=32000,
            hidden_size=HEADS * HEAD_DIM,
            intermediate_size=14336,
            num_hidden_layers=args.layers,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            max_position_embeddings=max(args.seq_lens) + args.steps + 1,
            rope_theta=500000.0,
        )
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        with device:  # initialise the random weights on the device
            model = AutoModelForCausalLM.from_config(
                model_config, attn_implementation="sdpa", dtype=dtype
            ).eval()
        models = [bench_model(model, s, args.steps, config) for s in args.seq_lens]
        _write_csv(models, args.out / "model.csv")
        rows += models
    if "pretrained" in args.workloads:
        pretrained = [
            row
            for name in args.pretrained
            for s in args.seq_lens
            for row in bench_pretrained(name, s, args.steps, args.depths, config)
        ]
        _write_csv(pretrained, args.out / "pretrained.csv")
        rows += pretrained
    print(f"CSV written to {args.out}/")
    _print_table(rows)


if __name__ == "__main__":
    main()
