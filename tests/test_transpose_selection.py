"""Query-side indices of a selection: `transpose_selection` and the mask-to-index helpers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnicompile.kernels.selection.transpose import (
    block_mask_to_indices,
    selection_from_block_mask,
    transpose_selection,
)


def _rows(num_blocks: torch.Tensor, indices: torch.Tensor) -> list[list[int]]:
    """The valid prefix of each row, as Python lists."""
    flat_n = num_blocks.reshape(-1).tolist()
    flat_i = indices.reshape(-1, indices.shape[-1]).tolist()
    return [row[:n] for n, row in zip(flat_n, flat_i)]


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 9), st.integers(1, 9)),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_block_mask_to_indices_lists_true_entries_ascending(
    shape: tuple[int, int, int, int], density: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=gen) < density
    num_blocks, indices = block_mask_to_indices(mask)
    n = shape[-1]
    assert num_blocks.dtype == torch.int32 and indices.dtype == torch.int32
    assert indices.shape == mask.shape
    expected = [torch.nonzero(row).flatten().tolist() for row in mask.reshape(-1, n)]
    assert _rows(num_blocks, indices) == expected
    padding = torch.arange(n) >= num_blocks.unsqueeze(-1)
    assert torch.all(indices[padding] == n)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    q_len=st.integers(1, 200),
    kv_len=st.integers(1, 200),
    block_size=st.sampled_from([16, 32, 64]),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_transpose_selection_lists_the_query_blocks_of_each_key_block(
    batch: int, heads: int, q_len: int, kv_len: int, block_size: int, density: float, seed: int
) -> None:
    nq, nk = -(-q_len // block_size), -(-kv_len // block_size)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, heads, nq, nk, generator=gen) < density
    selection = selection_from_block_mask(mask, block_size, q_len, kv_len)
    q_num_blocks, q_indices = transpose_selection(selection)
    assert q_num_blocks.shape == (batch, heads, nk) and q_indices.shape == (batch, heads, nk, nq)
    assert q_num_blocks.dtype == torch.int32 and q_indices.dtype == torch.int32
    kv_rows = _rows(selection.kv_num_blocks, selection.kv_indices)
    q_rows = _rows(q_num_blocks, q_indices)
    for b in range(batch):
        for h in range(heads):
            for j in range(nk):
                chose_j = [i for i in range(nq) if j in kv_rows[(b * heads + h) * nq + i]]
                assert q_rows[(b * heads + h) * nk + j] == chose_j
    assert torch.all(q_indices[torch.arange(nq) >= q_num_blocks.unsqueeze(-1)] == nq)


def test_selection_from_block_mask_rejects_a_mask_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="does not match"):
        selection_from_block_mask(torch.ones(1, 1, 2, 3, dtype=torch.bool), 16, 32, 32)
