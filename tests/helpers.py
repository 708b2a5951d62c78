"""Shared test helpers (import as `from tests.helpers import ...`).

Per-dtype tolerances, the numerics check against them, the calls in an FX graph, and a CUDA-graph
capture.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import GraphModule

# Relative-error budgets (||out - ref|| / ||ref||) per dtype, for outputs and for gradients.
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
GRAD_REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32; NaN anywhere gives inf."""
    out, ref = out.float(), ref.float()
    if torch.isnan(out).any():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def cuda_graph(fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """(graph, outputs) of ``fn`` captured in a CUDA graph after one warm-up call on a side stream;
    ``graph.replay()`` rewrites the outputs in place."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


def stable_seed(*parts: object) -> int:
    """A seed from ``parts`` that is the same in every process (``hash`` of a str is salted per process,
    so a failure seeded with it cannot be reproduced)."""
    return zlib.crc32(repr(parts).encode())


def check_numerics(output: torch.Tensor, reference: torch.Tensor) -> None:
    """Same shape and dtype, and a relative error within ``REL_TOL`` of the dtype."""
    assert output.shape == reference.shape and output.dtype == reference.dtype
    assert rel_error(output, reference) <= REL_TOL[reference.dtype]


def targets(gm: GraphModule) -> list[Any]:
    """The target of every call (function or method) in ``gm``'s graph, in graph order."""
    return [node.target for node in gm.graph.nodes if node.op in ("call_function", "call_method")]


# A tiny decoder LM config (transformers keyword arguments): 2 layers, 4 query heads, 2 KV heads.
SMALL_LM = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
