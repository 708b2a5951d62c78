"""Fused Triton selection against `reference.select_blocks`: every field of the `BlockSelection` equal.

Runs under the Triton interpreter on the CPU (tests/conftest.py), tiny shapes: causal, unmasked and
bool masks (with batch / head dims), GQA with the three budget scopes, lazy on and off, tau < 1 and
tau = 1, min/max_blocks clamps, partial last blocks, Sq != Skv. Tolerance: none, every case is exact.
Random softmax rows have no ties, and a cumulative mass within float32 rounding (~1e-7) of tau + slack,
the one place the kernel's tree sums could disagree with the reference's cumsum, is improbable; the tie
cases use dyadic values whose sums are exact in float32.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnicompile import OmniSparseConfig
from omnicompile.kernels.masks import allowed_blocks
from omnicompile.kernels.selection import BlockSelection, SelectionCall, forced_pattern
from omnicompile.kernels.selection.reference import select_blocks as reference_select
from omnicompile.kernels.selection.triton_select import MAX_KV_BLOCKS, select_blocks, supported
from omnicompile.method import selection_params

pytestmark = pytest.mark.interpreter

BLOCK = 16
MASK_KINDS = ("causal", "none", "bool")
# Broadcast shapes of a bool block mask: (batch dim, head dim) kept or 1, or a plain [nq, nk].
BOOL_SHAPES = ("batch", "heads", "both", "2d")


def _allowed(kind: str, shape: str, batch: int, heads: int, q_len: int, kv_len: int, gen) -> torch.Tensor:
    """bool allowed blocks: `allowed_blocks` for causal / no mask, else a random block mask of that shape."""
    if kind != "bool":
        return allowed_blocks(None, kind == "causal", batch, heads, q_len, kv_len, BLOCK, "cpu")
    nq, nk = -(-q_len // BLOCK), -(-kv_len // BLOCK)
    dims = {"batch": (batch, 1), "heads": (1, heads), "both": (batch, heads), "2d": ()}[shape]
    return torch.rand(*dims, nq, nk, generator=gen) < 0.6


def _softmax_estimate(allowed, batch, heads, config, is_causal, sharpness, gen) -> torch.Tensor:
    """Random softmax rows over the allowed blocks (zeros elsewhere); forced blocks boosted at random
    so that some query blocks are lazy."""
    nq, nk = allowed.shape[-2:]
    pattern = forced_pattern(nq, nk, config.n_sink, config.n_local, is_causal, "cpu")
    boost = 4.0 * (torch.rand(batch, heads, nq, 1, generator=gen) < 0.4)
    logits = sharpness * torch.randn(batch, heads, nq, nk, generator=gen) + boost * pattern
    logits = torch.where(allowed.expand(batch, heads, nq, nk), logits, -torch.inf)
    return logits.softmax(-1).nan_to_num(0.0)


def _assert_same(ahat, allowed, config, kv_heads, is_causal, q_len, kv_len) -> BlockSelection:
    args = (ahat, allowed, selection_params(config), SelectionCall(kv_heads, is_causal, q_len, kv_len))
    got, ref = select_blocks(*args), reference_select(*args)
    for name in ("kv_num_blocks", "kv_indices", "lazy", "budget"):
        a, b = getattr(got, name), getattr(ref, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name} differs at {(a != b).nonzero()[:5].tolist()}"
    assert (got.block_size, got.q_len, got.kv_len) == (ref.block_size, ref.q_len, ref.kv_len)
    return got


configs = st.builds(
    OmniSparseConfig,
    tau=st.sampled_from([0.5, 0.8, 0.95, 1.0]),
    block_size=st.just(BLOCK),
    n_sink=st.integers(0, 2),
    n_local=st.integers(1, 3),
    query_selection=st.booleans(),
    lazy_threshold=st.sampled_from([None, 0.7]),
    min_blocks=st.integers(0, 2),
    max_blocks=st.sampled_from([None, 2, 3]),
    budget_scope=st.sampled_from(["heads", "kv_group", "head"]),
    dense_last_blocks=st.integers(0, 2),
    dense_fallback_density=st.sampled_from([0.5, 0.8, 1.0]),
)


@settings(max_examples=25, deadline=None)
@given(
    config=configs,
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 2),
    q_len=st.integers(1, 80),
    kv_len=st.integers(1, 80),
    mask_kind=st.sampled_from(MASK_KINDS),
    bool_shape=st.sampled_from(BOOL_SHAPES),
    sharpness=st.sampled_from([1.0, 3.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_property(
    config, batch, kv_heads, group, q_len, kv_len, mask_kind, bool_shape, sharpness, seed
):
    gen = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    is_causal = mask_kind == "causal"
    allowed = _allowed(mask_kind, bool_shape, batch, heads, q_len, kv_len, gen)
    ahat = _softmax_estimate(allowed, batch, heads, config, is_causal, sharpness, gen)
    _assert_same(ahat, allowed, config, kv_heads, is_causal, q_len, kv_len)


@pytest.mark.parametrize("scope", ["heads", "kv_group", "head"])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_scopes_and_clamps(scope, mask_kind):
    """GQA (4 heads on 2 KV heads), partial last blocks, Sq != Skv, each scope under a min and a max clamp."""
    gen = torch.Generator().manual_seed(7)
    batch, heads, q_len, kv_len = 1, 4, 57, 91
    allowed = _allowed(mask_kind, "both", batch, heads, q_len, kv_len, gen)
    for clamp in ({"min_blocks": 2}, {"max_blocks": 1}):
        config = OmniSparseConfig(block_size=BLOCK, tau=0.8, budget_scope=scope, **clamp)
        ahat = _softmax_estimate(allowed, batch, heads, config, mask_kind == "causal", 2.0, gen)
        _assert_same(ahat, allowed, config, 2, mask_kind == "causal", q_len, kv_len)


def test_lazy_on_and_off():
    gen = torch.Generator().manual_seed(3)
    allowed = _allowed("causal", "", 1, 2, 80, 80, gen)
    config = OmniSparseConfig(block_size=BLOCK, tau=0.9, lazy_threshold=0.6, dense_fallback_density=1.0)
    ahat = _softmax_estimate(allowed, 1, 2, config, True, 3.0, gen)
    on = _assert_same(ahat, allowed, config, 1, True, 80, 80)
    off = _assert_same(ahat, allowed, config.replace(query_selection=False), 1, True, 80, 80)
    assert on.lazy.any() and not on.lazy.all() and not off.lazy.any()


@pytest.mark.parametrize("is_causal", [True, False])
def test_tau_one_takes_every_allowed_block(is_causal):
    gen = torch.Generator().manual_seed(5)
    batch, heads, q_len, kv_len = 2, 2, 70, 45
    kind = "causal" if is_causal else "bool"
    allowed = _allowed(kind, "batch", batch, heads, q_len, kv_len, gen)
    config = OmniSparseConfig(block_size=BLOCK, tau=1.0, query_selection=False)
    ahat = _softmax_estimate(allowed, batch, heads, config, is_causal, 1.0, gen)
    got = _assert_same(ahat, allowed, config, 1, is_causal, q_len, kv_len)
    assert torch.equal(got.dense_mask(), allowed.expand_as(ahat))


@pytest.mark.parametrize("scope", ["heads", "head"])
@pytest.mark.parametrize("tau", [0.5, 0.8])
def test_ties_follow_the_stable_order(scope, tau):
    """Dyadic estimates with many exact ties (and zeros): equal to the reference, sums exact in float32."""
    gen = torch.Generator().manual_seed(11)
    batch, heads, q_len, kv_len = 1, 2, 64, 160
    allowed = _allowed("bool", "both", batch, heads, q_len, kv_len, gen)
    levels = torch.tensor([0.0, 1.0, 2.0, 4.0]) / 16
    ahat = levels[torch.randint(0, 4, (batch, heads, 4, 10), generator=gen)] * allowed
    for max_blocks in (None, 2):
        config = OmniSparseConfig(block_size=BLOCK, tau=tau, budget_scope=scope, max_blocks=max_blocks)
        _assert_same(ahat, allowed, config, 1, False, q_len, kv_len)


def test_all_zero_rows_take_lowest_indices():
    """All-equal (zero) estimates: need = every available block, the clamp keeps the lowest indices."""
    allowed = torch.ones(1, 1, 3, 6, dtype=torch.bool)
    config = OmniSparseConfig(block_size=BLOCK, n_sink=1, n_local=1, max_blocks=2, dense_last_blocks=0)
    got = _assert_same(torch.zeros(1, 2, 3, 6), allowed, config, 1, True, 48, 96)
    # Row i forces {0, i} and takes the two lowest of the other blocks.
    expected = [[0, 1, 2, 6, 6, 6], [0, 1, 2, 3, 6, 6], [0, 1, 2, 3, 6, 6]]
    assert got.kv_indices[0, 0].tolist() == expected
    assert got.budget.tolist() == [[[2, 2, 2]] * 2]


def test_supported_reasons(monkeypatch):
    ahat, allowed = torch.zeros(1, 2, 3, 4), torch.ones(1, 1, 3, 4, dtype=torch.bool)
    assert supported(ahat, allowed) is None
    assert supported(ahat, torch.ones(3, 4, dtype=torch.bool)) is None
    assert "float32" in supported(ahat.double(), allowed)
    assert "float32" in supported(ahat[0], allowed)
    assert "bool" in supported(ahat, allowed.float())
    assert "broadcast" in supported(ahat, torch.ones(1, 3, 3, 4, dtype=torch.bool))
    assert "broadcast" in supported(ahat[:, :, :, :1], allowed)
    assert "empty" in supported(ahat[:, :, :0], allowed[:, :, :0])
    assert f"at most {MAX_KV_BLOCKS}" in supported(
        torch.zeros(1, 1, 1, MAX_KV_BLOCKS + 1), torch.ones(1, dtype=torch.bool)
    )
    config = OmniSparseConfig(block_size=BLOCK)
    with pytest.raises(ValueError, match="float32"):
        select_blocks(ahat.double(), allowed, selection_params(config), SelectionCall(1, True, 48, 64))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        select_blocks(ahat, allowed, selection_params(config), SelectionCall(3, True, 48, 64))
    with pytest.raises(ValueError, match="do not match"):
        select_blocks(ahat, allowed, selection_params(config), SelectionCall(1, True, 48, 65))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "CUDA" in supported(ahat, allowed)


@pytest.mark.parametrize("n", [1, 3])
def test_final_blocks_in_full_match_reference(n):
    """Interpreter vs reference with the last n query blocks in full (lazy and budget included)."""
    gen = torch.Generator().manual_seed(11)
    allowed = _allowed("causal", "", 1, 4, 100, 100, gen)
    config = OmniSparseConfig(block_size=BLOCK, tau=0.8, lazy_threshold=0.5, dense_last_blocks=n)
    ahat = _softmax_estimate(allowed, 1, 4, config, True, 3.0, gen)
    got = _assert_same(ahat, allowed, config, 2, True, 100, 100)
    assert torch.equal(got.dense_mask()[:, :, -n:], allowed.expand_as(ahat)[:, :, -n:])
    assert not got.lazy[:, :, -n:].any()
