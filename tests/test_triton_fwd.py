"""The Triton block-sparse forward equals the pure-PyTorch reference given the same selection.

Runs under the Triton interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1 without a
GPU), at tiny shapes: causal and not, GQA, partial last blocks, Sq != Skv, bool and additive masks,
split tiles (BLOCK_M, BLOCK_N < b), random and real selections, a logit soft-cap with every mask
kind; a full selection equals dense SDPA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from omnicompile.config import OmniSparseConfig
from omnicompile.kernels.estimation.reference import estimate_blocks
from omnicompile.kernels.masks import allowed_blocks, window_mask
from omnicompile.kernels.selection import SelectionCall, select_blocks
from omnicompile.kernels.selection.transpose import selection_from_block_mask
from omnicompile.kernels.sparse_attention.launch import LaunchConfig, unit_order
from omnicompile.kernels.sparse_attention.reference import sparse_attention as reference_attention
from omnicompile.kernels.sparse_attention.triton_fwd import sparse_attention, supported
from omnicompile.method import estimation_params, selection_params
from tests.helpers import REL_TOL, rel_error, stable_seed

pytestmark = pytest.mark.interpreter

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Largest |lse - lse_ref| on rows that attend to something (both compute fp32 scores of the same inputs).
LSE_ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}


def _inputs(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype, gen):
    q = torch.randn(batch, heads, q_len, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen).to(dtype)
    return q, k, v


def _random_selection(batch, heads, q_len, kv_len, block, density, gen):
    """Random blocks, any of them (above the causal diagonal too: the kernel must mask them out)."""
    nq, nk = -(-q_len // block), -(-kv_len // block)
    mask = torch.rand(batch, heads, nq, nk, generator=gen) < density
    return selection_from_block_mask(mask, block, q_len, kv_len)


def _check(q, k, v, selection, attn_mask, is_causal, scale=None, launch=None, window=None, softcap=None):
    out, lse = sparse_attention(
        q, k, v, selection, attn_mask, is_causal, scale, window=window, softcap=softcap, launch=launch
    )
    ref_out, ref_lse = reference_attention(
        q, k, v, selection, attn_mask, is_causal, scale, window=window, softcap=softcap
    )
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == torch.float32
    assert rel_error(out, ref_out) < REL_TOL[q.dtype]
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    assert torch.all(out[empty] == 0)
    assert torch.all((lse - ref_lse)[~empty].abs() < LSE_ATOL[q.dtype])
    return empty


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize(
    "shape",
    [
        (1, 2, 2, 64, 64, 32, 16),  # B, H, Hkv, Sq, Skv, D, b: exact blocks
        (2, 4, 2, 70, 45, 32, 16),  # GQA, Sq > Skv, partial last blocks
        (1, 4, 1, 40, 100, 48, 16),  # MQA, Sq < Skv, padded head dim
    ],
)
def test_matches_reference_random_selection(dtype, is_causal, shape):
    gen = torch.Generator().manual_seed(stable_seed(str(dtype), is_causal, shape))
    batch, heads, kv_heads, q_len, kv_len, head_dim, block = shape
    q, k, v = _inputs(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype, gen)
    selection = _random_selection(batch, heads, q_len, kv_len, block, 0.5, gen)
    _check(q, k, v, selection, None, is_causal, scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_attn_mask(dtype, kind):
    gen = torch.Generator().manual_seed(7)
    q, k, v = _inputs(1, 4, 2, 50, 60, 32, dtype, gen)
    selection = _random_selection(1, 4, 50, 60, 16, 0.7, gen)
    if kind == "bool":
        mask = torch.rand(4, 50, 60, generator=gen) < 0.6  # broadcast over the batch
        mask[1, 3] = False  # a fully masked row
    else:
        mask = torch.randn(1, 1, 50, 60, generator=gen).to(dtype)
        mask[..., 5, :] = float("-inf")
    empty = _check(q, k, v, selection, mask, False)
    assert empty.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masking", ["none", "causal", "window", "bool", "additive"])
def test_softcap_matches_reference(dtype, masking):
    """Scores spread over +-8 capped at 2 (tanh saturates): both loops (mask-free run and masked)."""
    gen = torch.Generator().manual_seed(stable_seed(str(dtype), masking))
    q, k, v = _inputs(1, 4, 2, 50, 60, 32, dtype, gen)
    selection = _random_selection(1, 4, 50, 60, 16, 0.7, gen)
    mask = None
    if masking == "bool":
        mask = torch.rand(50, 60, generator=gen) < 0.7
    if masking == "additive":
        mask = torch.randn(1, 4, 50, 60, generator=gen).to(dtype)
    causal, window = masking in ("causal", "window"), 20 if masking == "window" else None
    _check(q, k, v, selection, mask, causal, scale=1.5, window=window, softcap=2.0)


def test_softcap_with_negative_scale():
    gen = torch.Generator().manual_seed(17)
    q, k, v = _inputs(1, 2, 1, 48, 48, 32, torch.float32, gen)
    _check(q, k, v, _random_selection(1, 2, 48, 48, 16, 0.8, gen), None, True, scale=-1.0, softcap=3.0)


def test_negative_scale():
    gen = torch.Generator().manual_seed(13)
    q, k, v = _inputs(1, 2, 1, 48, 48, 32, torch.float32, gen)
    _check(q, k, v, _random_selection(1, 2, 48, 48, 16, 0.8, gen), None, True, scale=-0.2)


@pytest.mark.parametrize("launch", [LaunchConfig(16, 16, 4, 1), LaunchConfig(32, 16, 4, 2)])
def test_split_tiles(launch):
    """Several programs per query block and several steps per key block (BLOCK_M, BLOCK_N < b)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = _inputs(1, 2, 1, 90, 90, 32, torch.float16, gen)
    selection = _random_selection(1, 2, 90, 90, 32, 0.6, gen)
    _check(q, k, v, selection, None, True, launch=launch)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2, 3]),
    q_len=st.integers(1, 80),
    kv_len=st.integers(1, 80),
    head_dim=st.sampled_from([16, 32, 48]),
    block=st.sampled_from([16, 32]),
    is_causal=st.booleans(),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_property(
    batch, kv_heads, group, q_len, kv_len, head_dim, block, is_causal, density, seed
):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _inputs(batch, kv_heads * group, kv_heads, q_len, kv_len, head_dim, torch.float32, gen)
    selection = _random_selection(batch, kv_heads * group, q_len, kv_len, block, density, gen)
    _check(q, k, v, selection, None, is_causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_causal", [True, False])
def test_full_selection_equals_sdpa(dtype, is_causal):
    gen = torch.Generator().manual_seed(11)
    q, k, v = _inputs(1, 4, 2, 77, 77, 64, dtype, gen)
    allowed = allowed_blocks(None, is_causal, 1, 4, 77, 77, 16, q.device).expand(1, 4, 5, 5)
    out, _ = sparse_attention(q, k, v, selection_from_block_mask(allowed, 16, 77, 77), None, is_causal, None)
    dense = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=is_causal, enable_gqa=True
    )
    assert rel_error(out, dense) < REL_TOL[dtype]


@pytest.mark.parametrize("is_causal", [True, False])
def test_real_selection(is_causal):
    """A selection made by the method (estimate, select) at a low tau."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = _inputs(1, 4, 2, 200, 200, 32, torch.float16, gen)
    config = OmniSparseConfig(tau=0.6, block_size=16, granularity=4)
    ahat = estimate_blocks(q, k, None, is_causal, 32**-0.5, estimation_params(config))
    allowed = allowed_blocks(None, is_causal, 1, 4, 200, 200, 16, q.device)
    selection = select_blocks(ahat, allowed, selection_params(config), SelectionCall(2, is_causal, 200, 200))
    assert selection.kv_num_blocks.sum() < allowed.expand_as(ahat).sum()
    _check(q, k, v, selection, None, is_causal)


@pytest.mark.parametrize("scope", ["heads", "kv_group", "head"])
def test_heaviest_first_schedule_changes_no_result(scope):
    """Per-head and per-group budgets make the work uneven: heaviest first and the causal order (the
    default) give identical out and lse, both equal to the reference (GQA, partial last block, flat_head)."""
    from omnicompile.demos.structured import structured_qkv

    q, k, v = structured_qkv(
        "flat_head", 1, 4, 2, 200, 32, seed=2, window=16, slash_period=96, needle_len=16, stripe_width=8
    )
    config = OmniSparseConfig(tau=0.8, block_size=16, granularity=4, budget_scope=scope)
    ahat = estimate_blocks(q, k, None, True, 32**-0.5, estimation_params(config))
    allowed = allowed_blocks(None, True, 1, 4, 200, 200, 16, q.device)
    selection = select_blocks(ahat, allowed, selection_params(config), SelectionCall(2, True, 200, 200))
    heaviest, causal = LaunchConfig(16, 16, 4, 1), LaunchConfig(16, 16, 4, 1, schedule="causal")
    order = unit_order(selection.kv_num_blocks, 2, "heaviest_first")
    causal_order = torch.arange(order.numel(), dtype=order.dtype).view(2, -1).flip(-1).flatten()
    assert not torch.equal(order, causal_order)
    _check(q, k, v, selection, None, True, launch=heaviest)
    got = sparse_attention(q, k, v, selection, None, True, None, launch=heaviest)
    want = sparse_attention(q, k, v, selection, None, True, None, launch=causal)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_unit_order_is_a_permutation_heaviest_first():
    counts = torch.tensor([[[1, 5, 2], [4, 0, 2], [3, 3, 3], [0, 9, 1]]], dtype=torch.int32)  # B 1, H 4, nq 3
    order = unit_order(counts, 2, "heaviest_first")
    assert sorted(order.tolist()) == list(range(6))
    group_max = counts.view(1, 2, 2, 3).amax(2).flatten()
    assert group_max[order.long()].tolist() == [9, 5, 4, 3, 3, 2]
    assert order.tolist() == [4, 1, 0, 5, 3, 2]  # ties (3, 3): the later query block first
    assert unit_order(counts, 2, "causal") is None  # the kernel's own order: [2, 1, 0, 5, 4, 3]


@pytest.mark.parametrize("is_causal", [False, True])
def test_long_selected_lists(is_causal):
    """Lists longer than one step of the kernel's mask-free-run count (128 entries): 260+ key blocks
    with a partial last one, random blocks (causal: blocks above the diagonal too, for rows of a
    query that ends past them)."""
    gen = torch.Generator().manual_seed(5)
    q_len, kv_len = (4165, 4165) if is_causal else (16, 4165)
    q, k, v = _inputs(1, 1, 1, q_len, kv_len, 16, torch.float32, gen)
    nq, nk = -(-q_len // 16), -(-kv_len // 16)
    mask = torch.rand(1, 1, nq, nk, generator=gen) < 0.9
    if is_causal:  # the last query block alone (the others would take the interpreter minutes)
        mask[:, :, :-1] = False
    selection = selection_from_block_mask(mask, 16, q_len, kv_len)
    assert selection.kv_num_blocks.max() > 200
    _check(q, k, v, selection, None, is_causal, launch=LaunchConfig(16, 16, 4, 1))


def test_rejects_mismatched_selection():
    gen = torch.Generator().manual_seed(0)
    q, k, v = _inputs(1, 2, 2, 64, 64, 32, torch.float32, gen)
    with pytest.raises(ValueError, match="does not fit"):
        sparse_attention(q, k, v, _random_selection(1, 2, 64, 48, 16, 0.5, gen), None, True, None)


def test_supported_reasons(monkeypatch):
    q = torch.zeros(1, 4, 8, 64, dtype=torch.bfloat16)
    kv = torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16)
    assert supported(q, kv, kv, None) is None
    assert "head dim" in supported(q[..., :40], kv[..., :40], kv[..., :40], None)
    assert "head dim" in supported(
        torch.zeros(1, 4, 8, 272), torch.zeros(1, 2, 8, 272), torch.zeros(1, 2, 8, 272), None
    )
    assert "dtypes" in supported(q.double(), kv.double(), kv.double(), None)
    assert "multiple" in supported(q[:, :3], kv, kv, None)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "CUDA" in supported(q, kv, kv, None)


# (Sq, Skv, window) at b = 16: windows that are and are not multiples of the block, partial last
# blocks, Sq != Skv, window >= S (plain causal).
WINDOWS = [(64, 64, 16), (70, 70, 10), (80, 58, 26), (48, 80, 32), (50, 50, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len, kv_len, window", WINDOWS)
def test_window_matches_reference(dtype, q_len, kv_len, window):
    """Random selections (blocks outside the band too: masked per element) and the band's own."""
    gen = torch.Generator().manual_seed(q_len * 1000 + window)
    q, k, v = _inputs(1, 4, 2, q_len, kv_len, 32, dtype, gen)
    _check(q, k, v, _random_selection(1, 4, q_len, kv_len, 16, 0.7, gen), None, True, window=window)
    allowed = allowed_blocks(None, True, 1, 4, q_len, kv_len, 16, q.device, window=window)
    band = selection_from_block_mask(allowed.expand(1, 4, -1, -1), 16, q_len, kv_len)
    _check(q, k, v, band, None, True, window=window, launch=LaunchConfig(16, 16, 4, 1))


def test_window_band_equals_sdpa():
    """b = 32 with BLOCK_N 16: the mask-free run sits between the band's edge and the diagonal."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = _inputs(1, 2, 1, 160, 160, 16, torch.float32, gen)
    allowed = allowed_blocks(None, True, 1, 2, 160, 160, 32, q.device, window=70)
    band = selection_from_block_mask(allowed.expand(1, 2, -1, -1), 32, 160, 160)
    launch = LaunchConfig(32, 16, 4, 1)
    out, _ = sparse_attention(q, k, v, band, None, True, None, window=70, launch=launch)
    mask = window_mask(160, 160, 70, q.device)
    assert rel_error(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)) < 1e-5


def test_window_rejects_non_causal():
    gen = torch.Generator().manual_seed(0)
    q, k, v = _inputs(1, 2, 2, 32, 32, 16, torch.float32, gen)
    selection = _random_selection(1, 2, 32, 32, 16, 1.0, gen)
    with pytest.raises(ValueError, match="is_causal=True"):
        sparse_attention(q, k, v, selection, None, False, None, window=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_finfo_min_mask_equals_bool(dtype):
    """An additive mask of 0 / finfo.min (transformers) attends exactly like its bool form: fully
    masked rows give out 0 and lse -inf, not a uniform average."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = _inputs(1, 2, 2, 40, 40, 16, dtype, gen)
    keep = torch.rand(1, 2, 40, 40, generator=gen) < 0.3
    keep[:, :, 5] = False
    additive = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
    selection = _random_selection(1, 2, 40, 40, 16, 1.0, gen)
    empty = _check(q, k, v, selection, additive, False)
    assert empty[:, :, 5].all()
    out, lse = sparse_attention(q, k, v, selection, additive, False, None)
    ref_out, ref_lse = sparse_attention(q, k, v, selection, keep, False, None)
    assert rel_error(out, ref_out) < REL_TOL[dtype]
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))


@pytest.mark.parametrize("head_dim", [80, 256])
@pytest.mark.parametrize("window", [None, 24])
def test_large_and_padded_head_dims(head_dim, window):
    gen = torch.Generator().manual_seed(head_dim)
    q, k, v = _inputs(1, 2, 1, 40, 40, head_dim, torch.bfloat16, gen)
    _check(q, k, v, _random_selection(1, 2, 40, 40, 16, 0.7, gen), None, True, window=window)


@pytest.mark.parametrize(
    "head_dim, window, kind", [(32, None, None), (48, None, "bool"), (32, 20, None), (80, None, "additive")]
)
def test_tma_loads_match_reference(head_dim, window, kind):
    """K/V through TMA descriptors (``LaunchConfig.tma``): K and V strided as [B, S, Hkv, D] views,
    a partial last block (kv_len 90), a padded head dim (48, 80), masks and a window."""
    gen = torch.Generator().manual_seed(head_dim)
    q, k, v = _inputs(1, 4, 2, 90, 90, head_dim, torch.float16, gen)
    k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (k, v))
    mask = None
    if kind is not None:
        keep = torch.rand(1, 1, 90, 90, generator=gen) < 0.7
        mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf")).half()
    selection = _random_selection(1, 4, 90, 90, 32, 0.7, gen)
    launch = LaunchConfig(32, 16, 4, 2, tma=True)
    _check(q, k, v, selection, mask, mask is None, launch=launch, window=window)
