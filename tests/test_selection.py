"""KV selection: invariants 2 and 3, lazy blocks, budget scopes, tau = 1, no host synchronisation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnicompile import OmniSparseConfig
from omnicompile.demos.structured import structured_qkv
from omnicompile.kernels.estimation import estimate_blocks
from omnicompile.kernels.masks import allowed_blocks
from omnicompile.kernels.selection import BlockSelection, SelectionCall, forced_pattern, select_blocks
from omnicompile.method import estimation_params, selection_params
from tests.attention_cases import Case, cases, make_mask, make_qkv

BLOCK = 16

configs = st.builds(
    OmniSparseConfig,
    tau=st.sampled_from([0.5, 0.8, 0.9, 0.95, 0.99]),
    block_size=st.just(BLOCK),
    granularity=st.just(4),
    n_sink=st.integers(0, 2),
    n_local=st.integers(1, 3),
    query_selection=st.booleans(),
    lazy_threshold=st.sampled_from([None, 0.7]),
    min_blocks=st.integers(0, 2),
    max_blocks=st.sampled_from([None, 3, 8]),
    budget_scope=st.sampled_from(["heads", "kv_group", "head"]),
    dense_last_blocks=st.just(0),  # the paper's rule; the final blocks in full: test_final_blocks_in_full
    dense_fallback_density=st.just(1.0),  # the paper's rule; dense heads: test_dense_heads_take_every_block
)


def _select(case: Case, cfg: OmniSparseConfig, structured: bool):
    if structured:
        q, k, _ = structured_qkv(
            "structured",
            case.batch,
            case.heads,
            case.kv_heads,
            256,
            32,
            seed=case.seed,
            window=16,
            slash_period=96,
            slashes=1,
            stripes=2,
            stripe_width=8,
            needles=2,
            needle_len=16,
        )
        attn_mask, is_causal = None, case.mask_kind == "causal"
    else:
        q, k, _ = make_qkv(case)
        attn_mask, is_causal = make_mask(case)
    batch, heads, q_len, kv_len = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    ahat = estimate_blocks(q, k, attn_mask, is_causal, q.shape[-1] ** -0.5, estimation_params(cfg))
    allowed = allowed_blocks(attn_mask, is_causal, batch, heads, q_len, kv_len, BLOCK, "cpu").expand_as(ahat)
    selection = select_blocks(
        ahat, allowed, selection_params(cfg), SelectionCall(k.shape[1], is_causal, q_len, kv_len)
    )
    forced = allowed & forced_pattern(ahat.shape[2], ahat.shape[3], cfg.n_sink, cfg.n_local, is_causal, "cpu")
    return ahat, allowed, forced, selection


def _check_format(selection: BlockSelection, allowed: torch.Tensor) -> torch.Tensor:
    """Indices ascending then padded with nk, counts consistent, selected blocks allowed.

    Returns the dense mask.
    """
    nk = selection.num_kv_blocks
    idx, count = selection.kv_indices, selection.kv_num_blocks
    assert idx.dtype == torch.int32 and count.dtype == torch.int32 and selection.budget.dtype == torch.int32
    valid = torch.arange(nk) < count.unsqueeze(-1)
    assert (idx[~valid] == nk).all()
    assert ((idx[..., 1:] > idx[..., :-1]) | ~valid[..., 1:]).all()
    dense = selection.dense_mask()
    assert torch.equal(dense.sum(-1), count.long())
    assert not (dense & ~allowed).any()
    return dense


@settings(max_examples=30, deadline=None)
@given(case=cases, cfg=configs, structured=st.booleans())
def test_selection_invariants(case: Case, cfg: OmniSparseConfig, structured: bool):
    """Forced blocks taken; lazy = local mass >= threshold and takes F(i) only; every active head reaches
    estimated recall >= tau (float64 recomputation) unless the max_blocks clamp binds; budgets equal
    within the budget scope; budgets inside [min_blocks, max_blocks] or all available blocks."""
    ahat, allowed, forced, selection = _select(case, cfg, structured)
    dense = _check_format(selection, allowed)
    assert not (forced & ~dense).any()
    local = (ahat.double() * forced).sum(-1)
    lazy = selection.lazy
    if cfg.query_selection:
        assert torch.equal(lazy, local >= cfg.effective_lazy_threshold)
    else:
        assert not lazy.any()
    assert torch.equal(dense[lazy], forced[lazy])
    assert (selection.budget[lazy] == 0).all()
    active = ~lazy
    extra = (dense & ~forced).sum(-1)
    assert torch.equal(extra, selection.budget.long())
    available = (allowed & ~forced).sum(-1)
    recall = (ahat.double() * dense).sum(-1)
    took_all = extra == available
    clamped = cfg.max_blocks is not None and cfg.max_blocks < available
    reaches = recall >= cfg.tau
    assert (reaches | took_all | clamped)[active & allowed.any(-1)].all()
    budget = selection.budget
    assert ((budget >= cfg.min_blocks) | took_all)[active].all()
    if cfg.max_blocks is not None:
        assert (budget <= cfg.max_blocks).all()
    group = case.heads // case.kv_heads
    scope_size = {"heads": case.heads, "kv_group": group, "head": 1}[cfg.budget_scope]
    shared = budget.view(case.batch, case.heads // scope_size, scope_size, -1)
    capped = (took_all | lazy).view_as(shared)
    top = torch.where(capped, -1, shared).amax(2, keepdim=True)
    assert (capped | (shared == top)).all()


@settings(max_examples=15, deadline=None)
@given(case=cases, tau=st.sampled_from([0.6, 0.9, 0.97]))
def test_per_head_budget_is_minimal(case: Case, tau: float):
    """Under budget_scope="head" (no clamp) k_h is the smallest count: dropping the smallest taken
    non-forced block falls below tau."""
    cfg = OmniSparseConfig(
        tau=tau,
        block_size=BLOCK,
        granularity=4,
        budget_scope="head",
        query_selection=False,
        dense_last_blocks=0,
        dense_fallback_density=1.0,
    )
    ahat, _allowed, forced, selection = _select(case, cfg, structured=False)
    dense = selection.dense_mask()
    extra = dense & ~forced
    smallest = torch.where(extra, ahat.double(), float("inf")).amin(-1)
    recall = (ahat.double() * dense).sum(-1)
    has_extra = extra.any(-1)
    assert (recall - smallest < tau)[has_extra].all()


@settings(max_examples=15, deadline=None)
@given(case=cases)
def test_tau_one_without_query_selection_takes_every_allowed_block(case: Case):
    """tau = 1 with query selection off selects every allowed block, also blocks with Ahat exactly 0."""
    cfg = OmniSparseConfig(tau=1.0, block_size=BLOCK, granularity=4, query_selection=False)
    ahat, allowed, _, _ = _select(case, cfg, structured=False)
    ahat = torch.where(torch.rand_like(ahat) < 0.3, 0.0, ahat)
    selection = select_blocks(
        ahat,
        allowed,
        selection_params(cfg),
        SelectionCall(case.kv_heads, case.mask_kind == "causal", case.q_len, case.kv_len),
    )
    assert torch.equal(selection.dense_mask(), allowed)


def test_forced_pattern_windows():
    causal = forced_pattern(4, 6, n_sink=1, n_local=2, is_causal=True, device="cpu")
    centred = forced_pattern(4, 6, n_sink=0, n_local=3, is_causal=False, device="cpu")
    assert causal.int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 0, 0],
    ]
    assert centred.int().tolist() == [
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
    ]


def test_budget_scopes_on_a_flat_head():
    """One near-flat head (flat_head preset, last head): "heads" inflates every head's budget, "kv_group"
    only its group's, "head" only its own; the structured heads' budgets order accordingly."""
    q, k, _ = structured_qkv(
        "flat_head", 1, 4, 2, 512, 32, seed=0, window=16, slash_period=128, needle_len=16, stripe_width=8
    )
    budgets = {}
    for scope in ("heads", "kv_group", "head"):
        cfg = OmniSparseConfig(
            tau=0.95,
            block_size=BLOCK,
            granularity=4,
            budget_scope=scope,
            query_selection=False,
            dense_fallback_density=1.0,
        )
        ahat = estimate_blocks(q, k, None, True, 32**-0.5, estimation_params(cfg))
        allowed = allowed_blocks(None, True, 1, 4, 512, 512, BLOCK, "cpu")
        budgets[scope] = (
            select_blocks(ahat, allowed, selection_params(cfg), SelectionCall(2, True, 512, 512))
            .budget.float()
            .mean(-1)[0]
        )
    flat = budgets["head"][3]
    assert flat > 2 * budgets["head"][:3].max()
    assert torch.equal(budgets["heads"], budgets["heads"][3].expand(4))
    assert torch.equal(budgets["kv_group"][2:], budgets["heads"][2:])
    assert (budgets["kv_group"][:2] < budgets["heads"][:2]).all()
    assert (budgets["head"][:3] <= budgets["kv_group"][:3]).all() and (
        budgets["head"][2] < budgets["kv_group"][2]
    )


def test_select_blocks_traces_without_host_synchronisation():
    """Dynamo traces select_blocks into one graph.

    fullgraph=True fails on .item(), nonzero, data-dependent shapes.
    """
    ahat = torch.rand(1, 4, 6, 6).softmax(-1)
    allowed = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    cfg = OmniSparseConfig(block_size=BLOCK, budget_scope="kv_group")
    compiled = torch.compile(select_blocks, backend="eager", fullgraph=True)
    got = compiled(ahat, allowed, selection_params(cfg), SelectionCall(2, True, 90, 90))
    want = select_blocks(ahat, allowed, selection_params(cfg), SelectionCall(2, True, 90, 90))
    assert torch.equal(got.kv_indices, want.kv_indices) and torch.equal(got.budget, want.budget)


@pytest.mark.parametrize(
    "heads, kv_heads, q_len, message", [(4, 3, 96, "multiple"), (4, 2, 80, "do not match")]
)
def test_select_blocks_rejects_bad_inputs(heads, kv_heads, q_len, message):
    ahat = torch.rand(1, heads, 6, 6)
    with pytest.raises(ValueError, match=message):
        select_blocks(
            ahat,
            torch.ones(1, 1, 6, 6, dtype=torch.bool),
            selection_params(OmniSparseConfig(block_size=BLOCK)),
            SelectionCall(kv_heads, False, q_len, 96),
        )


@pytest.mark.parametrize("scope", ["heads", "kv_group", "head"])
@pytest.mark.parametrize("n", [1, 2])
def test_final_blocks_in_full(scope: str, n: int):
    """The last n query blocks select every allowed block and are active; the others are unchanged."""
    q, k, _ = structured_qkv(
        "structured",
        1,
        4,
        2,
        256,
        32,
        seed=3,
        window=16,
        slash_period=96,
        slashes=1,
        stripes=2,
        stripe_width=8,
        needles=2,
        needle_len=16,
    )
    base = OmniSparseConfig(
        block_size=BLOCK, granularity=4, tau=0.8, lazy_threshold=0.5, budget_scope=scope, dense_last_blocks=0
    )
    ahat = estimate_blocks(q, k, None, True, q.shape[-1] ** -0.5, estimation_params(base))
    allowed = allowed_blocks(None, True, 1, 4, 256, 256, BLOCK, "cpu")
    call = SelectionCall(2, True, 256, 256)
    off = select_blocks(ahat, allowed, selection_params(base), call)
    on = select_blocks(ahat, allowed, selection_params(base.replace(dense_last_blocks=n)), call)
    assert off.lazy.any() and not torch.equal(off.dense_mask()[:, :, -n:], allowed.expand_as(ahat)[:, :, -n:])
    assert torch.equal(on.dense_mask()[:, :, -n:], allowed.expand_as(ahat)[:, :, -n:])
    assert not on.lazy[:, :, -n:].any()
    assert torch.equal(on.dense_mask()[:, :, :-n], off.dense_mask()[:, :, :-n])
    assert torch.equal(on.lazy[:, :, :-n], off.lazy[:, :, :-n]) and torch.equal(
        on.budget[:, :, :-n], off.budget[:, :, :-n]
    )


@pytest.mark.parametrize("scope", ["heads", "kv_group", "head"])
def test_dense_heads_take_every_block(scope: str):
    """A (b, h) whose selection computes more than dense_fallback_density of its allowed blocks takes
    every allowed block and is active everywhere; every other head is unchanged."""
    q, k, _ = structured_qkv(
        "flat_head", 1, 4, 2, 512, 32, seed=0, window=16, slash_period=128, needle_len=16, stripe_width=8
    )
    base = OmniSparseConfig(block_size=BLOCK, granularity=4, budget_scope=scope, dense_fallback_density=1.0)
    ahat = estimate_blocks(q, k, None, True, 32**-0.5, estimation_params(base))
    allowed = allowed_blocks(None, True, 1, 4, 512, 512, BLOCK, "cpu").expand(1, 4, -1, -1)
    call = SelectionCall(2, True, 512, 512)
    sparse = select_blocks(ahat, allowed, selection_params(base), call)
    head_density = sparse.kv_num_blocks.sum(-1).double() / allowed.sum((-1, -2))
    threshold = head_density.median().item()
    dense_heads = head_density > threshold
    assert dense_heads.any() and not dense_heads.all()
    got = select_blocks(ahat, allowed, selection_params(base.replace(dense_fallback_density=threshold)), call)
    assert torch.equal(got.dense_mask()[dense_heads], allowed[dense_heads])
    assert not got.lazy[dense_heads].any()
    for name in ("kv_num_blocks", "kv_indices", "lazy", "budget"):
        assert torch.equal(getattr(got, name)[~dense_heads], getattr(sparse, name)[~dense_heads]), name
