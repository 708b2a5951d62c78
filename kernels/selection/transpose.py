"""Index lists from block masks, and the query-side (transposed) view of a `BlockSelection`.

The backward pass computes dk/dv per key block, so it needs, for each key block, the query
blocks that selected it: FlexAttention's ``q_num_blocks`` / ``q_indices``. Everything here runs
on the selection's device with no host synchronisation.
"""

from __future__ import annotations

import torch

from .block_selection import BlockSelection


def block_mask_to_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Count and ascending index list of the True entries of each row of a block mask.

    Args:
        mask: bool [..., n], True where a block is taken.

    Returns:
        num_blocks: int32 [...], number of True entries per row.
        indices: int32 [..., n], the True positions ascending in the first ``num_blocks``
            entries, padded with ``n``.
    """
    n = mask.shape[-1]
    num_blocks = mask.sum(-1, dtype=torch.int32)
    # Each True entry goes to its rank among the row's True entries, so the first num_blocks
    # slots hold the positions ascending and the rest keep the padding; False entries go to a
    # spill slot n that is cut off. Linear time, no sort.
    slot = torch.where(mask, mask.cumsum(-1, dtype=torch.int32) - 1, n).long()
    positions = torch.arange(n, dtype=torch.int32, device=mask.device).expand_as(mask)
    indices = torch.full(mask.shape[:-1] + (n + 1,), n, dtype=torch.int32, device=mask.device)
    indices.scatter_(-1, slot, positions)
    return num_blocks, indices[..., :n].contiguous()


def selection_from_block_mask(mask: torch.Tensor, block_size: int, q_len: int, kv_len: int) -> BlockSelection:
    """A `BlockSelection` taking exactly the blocks of a block mask (tests, benchmarks).

    Args:
        mask: bool [B, H, nq, nk], True where query block i takes key block j.
        block_size: block size b; nq = ceil(q_len / b), nk = ceil(kv_len / b).
        q_len, kv_len: Sq and Skv.

    Returns:
        The selection; no block is lazy and the budget fields are 0 (no estimate made it).
    """
    nq, nk = -(-q_len // block_size), -(-kv_len // block_size)
    if mask.shape[-2:] != (nq, nk):
        raise ValueError(f"block mask of shape {tuple(mask.shape)} does not match nq={nq}, nk={nk}")
    num_blocks, indices = block_mask_to_indices(mask)
    zeros = torch.zeros_like(num_blocks)
    return BlockSelection(num_blocks, indices, zeros.bool(), zeros, block_size, q_len, kv_len)


def transpose_selection(selection: BlockSelection) -> tuple[torch.Tensor, torch.Tensor]:
    """For each key block, the query blocks whose selection holds it.

    Args:
        selection: the forward selection (kv_indices int32 [B, H, nq, nk]).

    Returns:
        q_num_blocks: int32 [B, H, nk], number of query blocks that selected key block j.
        q_indices: int32 [B, H, nk, nq], those query blocks ascending, padded with ``nq``.
    """
    return block_mask_to_indices(selection.dense_mask().transpose(-1, -2))
