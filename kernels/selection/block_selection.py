"""`BlockSelection`: the selection data structure every kernel reads.

Like FlexAttention's ``kv_num_blocks`` / ``kv_indices``: per (batch, query head, query block) a
count and an ascending list of key-block indices, padded. It is built on the device with no host
synchronisation; shapes are static given (B, H, Sq, Skv, block_size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockSelection:
    """Selected key blocks per (batch, query head, query block).

    Attributes:
        kv_num_blocks: int32 [B, H, nq], number of selected key blocks (forced blocks included).
        kv_indices: int32 [B, H, nq, nk], selected key-block indices ascending in the first
            ``kv_num_blocks`` entries; the padding after them holds ``nk`` (out of range).
        lazy: bool [B, H, nq], query blocks classified lazy (they attend to their forced blocks only).
        budget: int32 [B, H, nq], the shared budget K of non-forced blocks applied to this
            (b, h, i) (0 for lazy blocks); equal across the heads that share it.
        block_size: query and key block size b.
        q_len, kv_len: Sq and Skv; nq = ceil(Sq / b), nk = ceil(Skv / b).
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    lazy: torch.Tensor
    budget: torch.Tensor
    block_size: int
    q_len: int
    kv_len: int

    @property
    def num_q_blocks(self) -> int:
        return self.kv_indices.shape[2]

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_indices.shape[3]

    def dense_mask(self) -> torch.Tensor:
        """bool [B, H, nq, nk]: True where key block j is selected for query block i."""
        nk = self.num_kv_blocks
        valid = torch.arange(nk, device=self.kv_indices.device) < self.kv_num_blocks.unsqueeze(-1)
        mask = torch.zeros(self.kv_indices.shape[:-1] + (nk + 1,), dtype=torch.bool, device=valid.device)
        idx = torch.where(valid, self.kv_indices.long(), nk)
        mask.scatter_(-1, idx, True)
        return mask[..., :nk]
