"""The Triton prefill kernels on CUDA at realistic sizes, each against an independent computation on the
same inputs:

- the sparse forward vs the reference ``sparse_attention`` (fp32 math) on real selections (estimate + select
  on structured inputs) and random ones: causal and not, GQA, partial blocks, Sq != Skv, bool and
  additive masks, head dims 64 / 96 / 128, bf16 / fp16; output memory pre-poisoned with NaN;
- tau = 1 without query selection: every allowed block is selected and the output equals dense SDPA;
- the fused estimator vs the reference estimator;
- the fused Triton selection vs ``select_blocks`` on the same estimate.

Output tolerances: ``tests.helpers.REL_TOL`` of the dtype (relative L2 error). How to run:
tests/gpu/__init__.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from omnicompile.config import OmniSparseConfig
from omnicompile.demos.structured import structured_qkv
from omnicompile.kernels.estimation.reference import estimate_blocks as reference_estimate
from omnicompile.kernels.estimation.triton_composite import estimate_blocks
from omnicompile.kernels.masks import allowed_blocks
from omnicompile.kernels.selection import SelectionCall, select_blocks, triton_select
from omnicompile.kernels.selection.block_selection import BlockSelection
from omnicompile.kernels.selection.transpose import selection_from_block_mask
from omnicompile.kernels.sparse_attention.reference import sparse_attention as reference_attention
from omnicompile.kernels.sparse_attention.triton_fwd import sparse_attention
from omnicompile.method import estimation_params, selection_params
from tests.gpu import ON_CUDA
from tests.helpers import REL_TOL, rel_error

pytestmark = ON_CUDA

LSE_ATOL = 1e-3  # max abs error of the log-sum-exp on rows with at least one allowed key
# The fused selection vs select_blocks: float32 sums may move a row's need by one block where its mass
# lands within rounding of tau, so nearly every row must be identical and no count may differ by more.
SAME_ROWS = 0.999
COUNT_SLACK = 1


def _select(q, k, is_causal: bool, config: OmniSparseConfig, ahat: torch.Tensor) -> BlockSelection:
    batch, heads, q_len, _ = q.shape
    allowed = allowed_blocks(None, is_causal, batch, heads, q_len, k.shape[2], config.block_size, q.device)
    return select_blocks(
        ahat,
        allowed,
        selection_params(config),
        SelectionCall(k.shape[1], is_causal, q_len, k.shape[2]),
    )


def _poison() -> None:
    """Fill half the caching allocator's free memory with NaN so an unwritten output shows."""
    torch.full((int(torch.cuda.mem_get_info()[0] * 0.5) // 4,), float("nan"), device="cuda")


def _random_selection(batch, heads, q_len, kv_len, density, gen) -> BlockSelection:
    nq, nk = -(-q_len // 64), -(-kv_len // 64)
    mask = torch.rand(batch, heads, nq, nk, generator=gen, device="cuda") < density
    return selection_from_block_mask(mask, 64, q_len, kv_len)


def _check_forward(q, k, v, selection: BlockSelection, attn_mask, is_causal: bool) -> None:
    """The forward against the fp32 reference on the same selection: output within REL_TOL, lse within
    LSE_ATOL, and rows with no allowed key -inf in lse and zero in the output."""
    _poison()
    out, lse = sparse_attention(q, k, v, selection, attn_mask, is_causal, None)
    ref_out, ref_lse = reference_attention(q, k, v, selection, attn_mask, is_causal, None)
    empty = torch.isneginf(ref_lse)
    assert not out.isnan().any()
    assert rel_error(out, ref_out) < REL_TOL[q.dtype]
    if (~empty).any():
        assert (lse - ref_lse)[~empty].abs().max().item() < LSE_ATOL
    assert torch.equal(torch.isneginf(lse), empty)
    assert (out[empty] == 0).all()


@pytest.mark.parametrize("seq, heads, kv_heads", [(4096, 8, 2), (32768, 32, 8)])
def test_forward_on_a_real_selection(seq, heads, kv_heads):
    config = OmniSparseConfig()
    q, k, v = structured_qkv("structured", 1, heads, kv_heads, seq, 128, dtype=torch.bfloat16, device="cuda")
    selection = _select(
        q, k, True, config, estimate_blocks(q, k, None, True, 128**-0.5, estimation_params(config))
    )
    _check_forward(q, k, v, selection, None, True)


@pytest.mark.parametrize(
    "dtype, head_dim, is_causal, q_len, kv_len",
    [
        (torch.float16, 64, False, 3000, 4000),
        (torch.bfloat16, 96, True, 4000, 3000),
        (torch.float16, 128, True, 1000, 1000),
        (torch.bfloat16, 128, False, 2500, 2500),
    ],
)
def test_forward_on_a_random_selection(dtype, head_dim, is_causal, q_len, kv_len):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, q_len, head_dim, device="cuda", generator=gen).to(dtype)
    k = torch.randn(2, 2, kv_len, head_dim, device="cuda", generator=gen).to(dtype)
    v = torch.randn(2, 2, kv_len, head_dim, device="cuda", generator=gen).to(dtype)
    _check_forward(q, k, v, _random_selection(2, 8, q_len, kv_len, 0.3, gen), None, is_causal)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_forward_with_a_mask(kind):
    """A bool mask (one row fully masked) or an additive bf16 [S, S] mask, not causal."""
    seq = 1500
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, 4, seq, 128, device="cuda", generator=gen).bfloat16()
    k = torch.randn(1, 2, seq, 128, device="cuda", generator=gen).bfloat16()
    v = torch.randn(1, 2, seq, 128, device="cuda", generator=gen).bfloat16()
    selection = _random_selection(1, 4, seq, seq, 0.5, gen)
    if kind == "bool":
        mask = torch.rand(1, 4, seq, seq, device="cuda", generator=gen) < 0.5
        mask[0, 1, 7] = False
    else:
        mask = torch.randn(seq, seq, device="cuda", generator=gen).bfloat16()
    _check_forward(q, k, v, selection, mask, False)


@pytest.mark.parametrize("seq, heads, kv_heads", [(4000, 8, 2), (32768, 32, 8)])
def test_tau_1_selects_every_allowed_block_and_equals_sdpa(seq, heads, kv_heads):
    config = OmniSparseConfig(tau=1.0, query_selection=False)
    q, k, v = structured_qkv("structured", 1, heads, kv_heads, seq, 128, dtype=torch.bfloat16, device="cuda")
    ahat = estimate_blocks(q, k, None, True, 128**-0.5, estimation_params(config))
    selection = _select(q, k, True, config, ahat)
    allowed = allowed_blocks(None, True, 1, heads, seq, seq, 64, q.device)
    assert torch.equal(selection.dense_mask(), allowed.expand_as(ahat))
    out, _ = sparse_attention(q, k, v, selection, None, True, None)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert rel_error(out, dense) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize(
    "estimator, seq, is_causal, preset",
    [
        ("composite", 8192, True, "structured"),
        ("composite", 5000, False, "structured"),
        ("pooled", 8192, True, "structured"),
        ("composite", 8192, True, "random"),
    ],
)
def test_fused_estimator_matches_the_reference(estimator, seq, is_causal, preset):
    """Ahat (float32) of the fused estimator on bf16 inputs within the bf16 REL_TOL of the reference's."""
    config = OmniSparseConfig(estimator=estimator)
    q, k, _ = structured_qkv(preset, 1, 8, 2, seq, 128, dtype=torch.bfloat16, device="cuda", seed=1)
    ahat = estimate_blocks(q, k, None, is_causal, 128**-0.5, estimation_params(config))
    ref = reference_estimate(q, k, None, is_causal, 128**-0.5, estimation_params(config))
    assert rel_error(ahat, ref) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize(
    "seq, is_causal, scope", [(32768, True, "heads"), (32768, True, "head"), (12000, False, "kv_group")]
)
def test_fused_selection_matches_select_blocks(seq, is_causal, scope):
    config = OmniSparseConfig(budget_scope=scope)
    q, k, _ = structured_qkv("structured", 1, 32, 8, seq, 128, dtype=torch.bfloat16, device="cuda", seed=2)
    ahat = estimate_blocks(q, k, None, is_causal, None, estimation_params(config))
    allowed = allowed_blocks(None, is_causal, 1, 32, seq, seq, config.block_size, q.device)
    ref = select_blocks(ahat, allowed, selection_params(config), SelectionCall(8, is_causal, seq, seq))
    _poison()
    fused = triton_select.select_blocks(
        ahat, allowed, selection_params(config), SelectionCall(8, is_causal, seq, seq)
    )
    same_rows = (fused.dense_mask() == ref.dense_mask()).all(-1).float().mean().item()
    assert same_rows > SAME_ROWS
    assert (fused.kv_num_blocks - ref.kv_num_blocks).abs().max().item() <= COUNT_SLACK
