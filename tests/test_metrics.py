"""Selection metrics against dense attention probabilities."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnicompile import OmniSparseConfig
from omnicompile.kernels.masks import allowed_blocks
from omnicompile.kernels.selection.transpose import selection_from_block_mask
from omnicompile.method import AttentionInputs, plan
from omnicompile.metrics import (
    dense_heads,
    density,
    exact_block_mass,
    exact_recall,
    head_densities,
    lazy_fraction,
    oracle_density,
    relative_error,
    selection_stats,
)
from tests.attention_cases import Case, cases, dense_probs, make_mask, make_qkv

BLOCK = 16


def _rows_per_block(case: Case, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(attending-row indicator [B, H, nq, b], count [B, H, nq]) from dense probabilities."""
    nq = -(-case.q_len // BLOCK)
    attends = torch.nn.functional.pad(probs.sum(-1) > 0.5, (0, nq * BLOCK - case.q_len)).view(
        *probs.shape[:2], nq, BLOCK
    )
    return attends, attends.sum(-1)


@settings(max_examples=20, deadline=None)
@given(case=cases, query_chunk=st.integers(1, 3))
def test_exact_block_mass_equals_dense_block_sums(case: Case, query_chunk: int):
    q, k, _ = make_qkv(case)
    attn_mask, is_causal = make_mask(case)
    probs = dense_probs(q, k, attn_mask, is_causal, case.dim**-0.5)
    nq, nk = -(-case.q_len // BLOCK), -(-case.kv_len // BLOCK)
    padded = torch.nn.functional.pad(probs, (0, nk * BLOCK - case.kv_len, 0, nq * BLOCK - case.q_len))
    per_row = padded.view(case.batch, case.heads, nq, BLOCK, nk, BLOCK).sum(-1)
    _, rows = _rows_per_block(case, probs)
    want = per_row.sum(3) / rows.clamp(min=1).unsqueeze(-1)
    got = exact_block_mass(q, k, attn_mask, is_causal, None, BLOCK, query_chunk)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(case=cases, density_=st.sampled_from([0.2, 0.6]))
def test_exact_recall_is_the_mean_row_mass_on_selected_tokens(case: Case, density_: float):
    q, k, _ = make_qkv(case)
    attn_mask, is_causal = make_mask(case)
    nq, nk = -(-case.q_len // BLOCK), -(-case.kv_len // BLOCK)
    blocks = (
        torch.rand(case.batch, case.heads, nq, nk, generator=torch.Generator().manual_seed(case.seed))
        < density_
    )
    selection = selection_from_block_mask(blocks, BLOCK, case.q_len, case.kv_len)
    probs = dense_probs(q, k, attn_mask, is_causal, case.dim**-0.5)
    tokens = blocks.repeat_interleave(BLOCK, 2).repeat_interleave(BLOCK, 3)[:, :, : case.q_len, : case.kv_len]
    row_recall = torch.nn.functional.pad((probs * tokens).sum(-1), (0, nq * BLOCK - case.q_len))
    attends, rows = _rows_per_block(case, probs)
    want = (row_recall.view_as(attends) * attends).sum(-1) / rows.clamp(min=1)
    want = torch.where(rows > 0, want, 1.0)
    got = exact_recall(exact_block_mass(q, k, attn_mask, is_causal, None, BLOCK), selection)
    assert got.shape == (case.batch, case.heads, nq)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_density_lazy_fraction_and_stats():
    case = Case(1, 2, 1, 64, 64, 8, "causal", 1)
    q, k, _ = make_qkv(case)
    allowed = allowed_blocks(None, True, 1, 2, 64, 64, BLOCK, "cpu")
    everything = selection_from_block_mask(allowed.expand(1, 2, 4, 4), BLOCK, 64, 64)
    assert density(everything, allowed) == 1.0
    diagonal = selection_from_block_mask(torch.eye(4, dtype=torch.bool).expand(1, 2, 4, 4), BLOCK, 64, 64)
    assert density(diagonal, allowed) == pytest.approx(4 / 10)
    assert lazy_fraction(diagonal) == 0.0
    assert dense_heads(everything, allowed) == 1.0 and dense_heads(diagonal, allowed) == 0.0
    one_head = selection_from_block_mask(
        torch.stack([allowed[0, 0], torch.eye(4, dtype=torch.bool)])[None], BLOCK, 64, 64
    )
    assert dense_heads(one_head, allowed) == 0.5
    torch.testing.assert_close(head_densities(one_head, allowed), torch.tensor([[1.0, 0.4]]))
    cfg = OmniSparseConfig(tau=0.9, block_size=BLOCK, granularity=4)
    selection = plan(AttentionInputs(q, k, None, None, True, None), cfg)
    mass = exact_block_mass(q, k, None, True, None, BLOCK)
    stats = selection_stats(selection, mass, allowed)
    recall = exact_recall(mass, selection)
    assert stats.density == pytest.approx(density(selection, allowed))
    assert stats.recall_mean == pytest.approx(recall.mean().item())
    assert stats.recall_min == pytest.approx(recall.min().item())
    assert stats.lazy_fraction == pytest.approx(selection.lazy.float().mean().item())
    active = ~selection.lazy
    assert stats.budget_mean == pytest.approx(
        selection.budget[active].float().mean().item() if active.any() else 0.0
    )
    assert stats.dense_heads == dense_heads(selection, allowed)
    assert set(stats.as_dict()) == {
        "density",
        "dense_heads",
        "recall_mean",
        "recall_min",
        "lazy_fraction",
        "budget_mean",
    }


def test_relative_error():
    ref = torch.tensor([3.0, 4.0])
    assert relative_error(ref.to(torch.bfloat16), ref) == 0.0
    assert relative_error(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0


def test_oracle_density_takes_the_fewest_blocks_at_the_mean_recall():
    """Row 0 holds 0.7 / 0.2 / 0.1 of its mass in three blocks, row 1 a quarter in each of four. At a
    mean recall of 0.725 the oracle takes one block of row 0 (0.7) and three of row 1 (0.75): 4 of 8;
    at recall 1 it takes every block that holds mass (3 + 4 of 8)."""
    mass = torch.tensor([[[[0.7, 0.2, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25]]]])
    allowed = torch.ones(1, 1, 2, 4, dtype=torch.bool)
    assert oracle_density(mass, allowed, 0.725)[0] == pytest.approx(4 / 8)
    assert oracle_density(mass, allowed, 1.0)[0] == pytest.approx(7 / 8)
    row_one_only = allowed.clone()
    row_one_only[..., 0, :] = False  # row 0 sees nothing: it needs no block and counts as recalled
    assert oracle_density(mass, row_one_only, 1.0)[0] == pytest.approx(4 / 4)
