"""The sparse forward's two work orders (``LaunchConfig.schedule``: ``"heaviest_first"`` and
``"causal"``) give bitwise equal outputs and log-sum-exps on CUDA.

B = 1, H = 32, Hkv = 8, D = 128, bf16, causal, S = 32K and 128K; presets ``mixed`` and ``mixed_flat``
(heads that differ in breadth, so the orders differ); budget scopes heads, kv_group, head. Timings of
both orders: benchmarks/bench_schedule.py. How to run: tests/gpu/__init__.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from omnicompile.config import OmniSparseConfig
from omnicompile.demos.structured import structured_qkv
from omnicompile.kernels.sparse_attention.launch import default_launch
from omnicompile.kernels.sparse_attention.triton_fwd import sparse_attention
from omnicompile.method import AttentionInputs, plan
from tests.gpu import ON_CUDA

pytestmark = ON_CUDA

HEADS, KV_HEADS, DIM = 32, 8, 128


@pytest.fixture(
    scope="module",
    params=[(seq, preset) for seq in (32768, 131072) for preset in ("mixed", "mixed_flat")],
    ids=lambda p: f"S{p[0]}-{p[1]}",
)
def inputs(request) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seq, preset = request.param
    return structured_qkv(preset, 1, HEADS, KV_HEADS, seq, DIM, dtype=torch.bfloat16, device="cuda", seed=0)


@pytest.mark.parametrize("scope", ["heads", "kv_group", "head"])
def test_both_schedules_give_bitwise_equal_results(inputs, scope):
    q, k, v = inputs
    config = OmniSparseConfig(budget_scope=scope)
    selection = plan(AttentionInputs(q, k, v, None, True, None), config)
    launch = default_launch(config.block_size, q.dtype, False, DIM)
    out_a, lse_a = sparse_attention(
        q, k, v, selection, None, True, None, launch=dataclasses.replace(launch, schedule="heaviest_first")
    )
    out_b, lse_b = sparse_attention(
        q, k, v, selection, None, True, None, launch=dataclasses.replace(launch, schedule="causal")
    )
    assert torch.equal(out_a, out_b)
    assert torch.equal(lse_a, lse_b)
