"""The Triton prefill forward and the fused row probe on CUDA at the served models' head dims, with and
without a sliding window.

D = 64 (H 9, Hkv 3: SmolLM2), 128 (9 / 3) and 256 (4 / 1: Gemma 3), window None and 512, bf16, B = 1,
causal, structured inputs, S = 8K and 32K; the selection is the one the op makes (fused estimator +
`select_on_device`, default config). Timings of the same cases: benchmarks/bench_head_dims.py. How to
run: tests/gpu/__init__.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from omnicompile.config import OmniSparseConfig
from omnicompile.demos.structured import structured_qkv
from omnicompile.kernels.estimation.reference import probe_block_mass as reference_probe
from omnicompile.kernels.estimation.triton_composite import estimate_blocks
from omnicompile.kernels.estimation.triton_probe import probe_block_mass
from omnicompile.kernels.masks import allowed_blocks, window_mask
from omnicompile.kernels.selection import BlockSelection, SelectionCall
from omnicompile.kernels.selection.transpose import selection_from_block_mask
from omnicompile.kernels.sparse_attention.reference import sparse_attention as reference_attention
from omnicompile.kernels.sparse_attention.triton_fwd import sparse_attention
from omnicompile.method import estimation_params, select_on_device, selection_params
from tests.gpu import ON_CUDA
from tests.helpers import REL_TOL, rel_error

pytestmark = ON_CUDA

SHAPES = [(64, 9, 3), (128, 9, 3), (256, 4, 1)]  # head dim, query heads, KV heads
SEQ_LENS = [8192, 32768]
WINDOWS = [None, 512]
PROBE_ATOL = 2e-2  # max abs error of a block's probe mass (bf16 dots vs the fp32 reference)


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    window: int | None
    allowed: torch.Tensor  # bool [1, H or 1, nq, nk]
    selection: BlockSelection


@pytest.fixture(
    scope="module",
    params=[(*shape, seq, window) for shape in SHAPES for seq in SEQ_LENS for window in WINDOWS],
    ids=lambda p: f"D{p[0]}-H{p[1]}/{p[2]}-S{p[3]}-window{p[4]}",
)
def case(request) -> Case:
    head_dim, heads, kv_heads, seq, window = request.param
    config = OmniSparseConfig()
    q, k, v = structured_qkv(
        "structured", 1, heads, kv_heads, seq, head_dim, dtype=torch.bfloat16, device="cuda"
    )
    allowed = allowed_blocks(None, True, 1, heads, seq, seq, config.block_size, q.device, window=window)
    ahat = estimate_blocks(q, k, None, True, None, estimation_params(config), window=window)
    selection = select_on_device(
        ahat, allowed, selection_params(config), SelectionCall(kv_heads, True, seq, seq)
    )
    return Case(q, k, v, window, allowed, selection)


def test_forward_matches_the_reference_on_its_selection(case: Case):
    q, k, v, window = case.q, case.k, case.v, case.window
    out, _ = sparse_attention(q, k, v, case.selection, None, True, None, window=window)
    ref, _ = reference_attention(q, k, v, case.selection, None, True, None, window=window)
    assert rel_error(out, ref) < REL_TOL[torch.bfloat16]


def test_band_forward_matches_sdpa(case: Case):
    """Every allowed block selected: the forward equals SDPA (is_causal, or the materialised window)."""
    q, k, v, window = case.q, case.k, case.v, case.window
    heads, seq = q.shape[1], q.shape[2]
    block_mask = case.allowed.expand(1, heads, -1, -1).contiguous()
    band = selection_from_block_mask(block_mask, case.selection.block_size, seq, seq)
    out, _ = sparse_attention(q, k, v, band, None, True, None, window=window)
    if window is None:
        dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:  # a masked SDPA materialises [H, rows, S] scores: 4096 query rows at a time
        mask = window_mask(seq, seq, window, q.device)
        dense = torch.cat(
            [
                F.scaled_dot_product_attention(
                    q[:, :, r : r + 4096], k, v, attn_mask=mask[r : r + 4096], enable_gqa=True
                )
                for r in range(0, seq, 4096)
            ],
            2,
        )
    assert rel_error(out, dense) < REL_TOL[torch.bfloat16]


def test_fused_probe_matches_the_torch_probe(case: Case):
    q, k, window = case.q, case.k, case.window
    scale, block = q.shape[-1] ** -0.5, case.selection.block_size
    probe = probe_block_mass(q, k, None, True, scale, block, window=window)
    ref = reference_probe(q, k, None, True, scale, block, window=window)
    assert (probe - ref).abs().max().item() < PROBE_ATOL
