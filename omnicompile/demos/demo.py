"""The demo: compile a built-in Llama-architecture model with the backend and show what it did.

Part 1 compiles the model (random weights, built from a config) in dense and in sparse mode and
compares its logits with eager. Random weights give nearly flat attention, on which no sparse
method can skip much, so part 2 runs the same op on structured attention inputs
(`omnicompile.demos.structured`: sinks, local windows, stripes, slashes, needles) where the method's
sparsity shows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..config import OmniSparseConfig
from ..explain import explain
from .models import build_model


@dataclass
class DemoSettings:
    """What the demo runs: model name, prompt length, device, and the sparse config options."""

    model: str = "llama-tiny"
    seq_len: int = 2048
    structured_len: int = 4096
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    tau: float = 0.95
    block_size: int = 64


def _max_error(logits: torch.Tensor, ref: torch.Tensor) -> float:
    return (logits.float() - ref.float()).abs().max().item()


def run_model_part(settings: DemoSettings, print_fn=print) -> dict[str, float]:
    """Compile the model in dense and sparse mode; print explain tables; return max logit errors."""
    dtype = torch.bfloat16 if settings.device == "cuda" else torch.float32
    model = build_model(settings.model, dtype=dtype, device=settings.device)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, settings.seq_len), device=settings.device)
    with torch.no_grad():
        eager = model(ids).logits
        errors = {}
        for mode in ("dense", "sparse"):
            cfg = OmniSparseConfig(
                mode=mode,
                tau=settings.tau,
                block_size=settings.block_size,
                min_seq_len=min(1024, settings.seq_len),
            )
            torch._dynamo.reset()
            start = time.perf_counter()
            report = explain(model, ids, config=cfg)
            elapsed = time.perf_counter() - start
            errors[mode] = _max_error(report.output.logits, eager)
            print_fn(
                f"\n== {settings.model}, {settings.seq_len} tokens, mode={mode} "
                f"(compile + run {elapsed:.1f} s)"
            )
            print_fn(str(report))
            print_fn(f"max |logits - eager| = {errors[mode]:.3e}")
    return errors


def run_structured_part(settings: DemoSettings, print_fn=print) -> dict[str, float]:
    """Run the op on structured q/k/v (one layer, 4 heads) and print density, recall and error."""
    from ..recording import recording
    from .structured import structured_qkv

    dtype = torch.bfloat16 if settings.device == "cuda" else torch.float32
    q, k, v = structured_qkv(
        "structured", 1, 4, 2, settings.structured_len, 64, dtype=dtype, device=settings.device, seed=0
    )
    cfg = OmniSparseConfig(tau=settings.tau, block_size=settings.block_size, min_seq_len=1024)
    with recording(measure=True) as recorder:
        torch.ops.omnisparse.attention(q, k, v, None, 0.0, True, None, True, cfg.to_json(), "structured")
    stats = recorder.runs[-1].stats
    print_fn(
        f"\n== structured attention input, {settings.structured_len} tokens, 4 heads, causal, "
        f"tau={settings.tau}"
    )
    print_fn("   " + ", ".join(f"{key} {value:.3f}" for key, value in stats.items()))
    return stats


def run_demo(settings: DemoSettings, print_fn=print) -> None:
    """Both parts of the demo."""
    print_fn(f"omnicompile demo on {settings.device} (torch {torch.__version__})")
    run_model_part(settings, print_fn)
    run_structured_part(settings, print_fn)
