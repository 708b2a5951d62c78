"""A `BlockSelection` as a FlexAttention `BlockMask`, to run ``flex_attention`` on the same selection."""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

from .block_selection import BlockSelection


def to_block_mask(selection: BlockSelection, is_causal: bool = False) -> BlockMask:
    """FlexAttention block mask computing exactly the selected blocks.

    Built with ``BlockMask.from_kv_blocks`` from ``kv_num_blocks`` / ``kv_indices`` (all blocks
    partial, so the mask_mod runs on each) at BLOCK_SIZE = block_size and seq_lengths = (Sq, Skv).
    The mask_mod keeps query row r and key c when r < Sq and c < Skv (partial last blocks), when
    ``is_causal`` only if c <= r (top-left, as SDPA), and only if key block c // b is selected for
    query block r // b. The last test repeats the block sparsity on purpose: eager (uncompiled)
    ``flex_attention`` ignores the block indices and applies the mask_mod alone, so without it the
    eager result would be dense attention. A bool or additive ``attn_mask`` is not part of the
    selection: pass it to ``flex_attention`` through a mask_mod or score_mod of your own.
    """
    q_len, kv_len, block = selection.q_len, selection.kv_len, selection.block_size
    selected = selection.dense_mask()

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        keep = (q_idx < q_len) & (kv_idx < kv_len) & selected[b, h, q_idx // block, kv_idx // block]
        return keep & (kv_idx <= q_idx) if is_causal else keep

    return BlockMask.from_kv_blocks(
        selection.kv_num_blocks,
        selection.kv_indices,
        BLOCK_SIZE=block,
        mask_mod=mask_mod,
        seq_lengths=(q_len, kv_len),
    )
