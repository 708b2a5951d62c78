"""Host work of one sparse call on the Triton path: the torch operators it runs beside its Triton
launches (each a launch and several microseconds of host time on CUDA, where the op is host-bound
without CUDA graphs: docs/BENCHMARKS.md). Counted with a dispatch mode under the Triton interpreter,
leaving out what the interpreter itself runs inside a launch."""

from __future__ import annotations

import dataclasses
import traceback
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from omnicompile.config import OmniSparseConfig
from omnicompile.kernels.estimation import triton_composite, triton_probe
from omnicompile.kernels.masks import allowed_blocks
from omnicompile.kernels.selection import SelectionCall, triton_select
from omnicompile.kernels.sparse_attention import triton_fwd
from omnicompile.method import estimation_params, selection_params

pytestmark = pytest.mark.interpreter

# Operators that launch nothing: allocations and views.
_NO_LAUNCH = {
    "aten.empty",
    "aten.empty_like",
    "aten.new_empty",
    "aten.view",
    "aten.expand",
    "aten.alias",
    "aten.transpose",
}


class _Operators(TorchDispatchMode):
    """Counts the aten operators called outside Triton's runtime (the interpreter's own are not a
    launch on CUDA)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not any("triton/runtime" in frame.filename for frame in traceback.extract_stack(limit=40)):
            self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def test_sparse_call_launches_few_torch_operators():
    """Estimate, probe, select and attend as `method.plan` / `method._attend` run them on CUDA: the
    composite means (one mean each of q and k) and the causal allowed blocks (ones, tril) are the only
    torch operators that launch; everything else is in the Triton kernels (the selection's counts, the
    forward's mask-free run and work order)."""
    config = OmniSparseConfig(block_size=16, min_seq_len=64)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 256, 32, generator=gen) for h in (4, 2, 2))
    estimation = dataclasses.replace(estimation_params(config), row_probe=False)
    with _Operators() as operators:
        allowed = allowed_blocks(None, True, 1, 4, 256, 256, config.block_size, q.device)
        ahat = triton_composite.estimate_blocks(q, k, None, True, 32**-0.5, estimation)
        ahat = triton_probe.probe_block_mass(q, k, None, True, 32**-0.5, config.block_size, ahat=ahat)
        selection = triton_select.select_blocks(
            ahat, allowed, selection_params(config), SelectionCall(2, True, 256, 256)
        )
        triton_fwd.sparse_attention(q, k, v, selection, None, True, None)
    launching = {name: n for name, n in operators.counts.items() if name not in _NO_LAUNCH}
    assert launching == {"aten.mean": 2, "aten.ones": 1, "aten.tril_": 1}, launching
