"""Tensors that depend only on shapes (block layouts, index orders), made once per shape.

The op runs once per attention layer with the same shapes; building such a tensor is a handful of
small launches and, more, their host time (the op was host-bound at 8-32K tokens on an H100,
docs/BENCHMARKS.md). `shape_constant` caches them per argument tuple.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec

import torch

P = ParamSpec("P")


def shape_constant(fn: Callable[P, torch.Tensor]) -> Callable[P, torch.Tensor]:
    """``fn`` (hashable arguments: sizes, flags, a device) cached per argument tuple.

    The cached tensors are shared: callers must not write into them. They are made outside
    inference mode (usable by autograd-recorded code later), and never cached while a CUDA graph is
    being captured (a tensor made then would live in the graph's memory pool, valid only in replay).
    """
    cached = functools.lru_cache(maxsize=64)(fn)

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> torch.Tensor:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return fn(*args, **kwargs)
        with torch.inference_mode(False):
            return cached(*args, **kwargs)

    wrapper.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    return wrapper
