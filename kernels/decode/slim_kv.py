"""`SlimKV`: the ragged key/value layout of one slimmed attention layer (METHOD.md section 4).

Each (batch row b, KV head h) keeps its own number of prompt tokens. The kept prompt tokens are stored
packed, segment after segment in (b, h) order, in one flat ``[N, D]`` buffer for keys and one for
values: nothing is padded to the longest head. Tokens that arrive after slimming (generated tokens) are
appended to every head, so they form a rectangular *tail* ``[B, Hkv, T, D]``.

Causality of a decode step with n >= 1 new queries (the n new tokens are the last n tail entries):
query j (0-based among the n) attends to every kept prompt token of its KV head (all of them lie in
its past) and to tail positions t <= T - n + j. With n = 1 the query sees the whole slim cache.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class SlimKV:
    """Slimmed keys and values of one layer.

    Attributes:
        k_packed, v_packed: [N, D], kept prompt keys/values of every (b, h) segment, concatenated.
        offsets: int32 [B, Hkv], first row of segment (b, h) in the packed buffers.
        lengths: int32 [B, Hkv], kept prompt tokens of segment (b, h).
        max_length: host copy of ``lengths.max()`` (0 when empty), for launch geometry without a sync.
        k_tail, v_tail: [B, Hkv, T, D], tokens appended after slimming (same for every head).
    """

    k_packed: Tensor
    v_packed: Tensor
    offsets: Tensor
    lengths: Tensor
    max_length: int
    k_tail: Tensor
    v_tail: Tensor

    @property
    def batch_size(self) -> int:
        return self.k_tail.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k_tail.shape[1]

    @property
    def tail_len(self) -> int:
        return self.k_tail.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k_tail.shape[3]

    @classmethod
    def pack(cls, k: Tensor, v: Tensor, keep: Tensor) -> SlimKV:
        """Pack the kept tokens of dense prompt keys/values; the tail starts empty.

        Args:
            k, v: [B, Hkv, S, D] prompt keys/values.
            keep: bool [B, Hkv, S], True where token s is kept for (b, h).
        """
        if keep.shape != k.shape[:3] or k.shape != v.shape:
            raise ValueError(
                f"SlimKV.pack: keep {tuple(keep.shape)} does not match k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        b, h, s = keep.nonzero(as_tuple=True)  # row-major: segments in (b, h) order, tokens ascending
        lengths = keep.sum(-1, dtype=torch.int32)
        offsets = (lengths.flatten().cumsum(0, dtype=torch.int32) - lengths.flatten()).view_as(lengths)
        empty_tail = k.new_empty(k.shape[0], k.shape[1], 0, k.shape[3])
        return cls(
            k_packed=k[b, h, s].contiguous(),
            v_packed=v[b, h, s].contiguous(),
            offsets=offsets,
            lengths=lengths,
            max_length=int(lengths.max()) if lengths.numel() else 0,
            k_tail=empty_tail,
            v_tail=empty_tail.clone(),
        )

    def append(self, k_new: Tensor, v_new: Tensor) -> SlimKV:
        """The same cache with ``k_new``, ``v_new`` [B, Hkv, n, D] appended to every head's tail."""
        if (
            k_new.shape[:2] != self.k_tail.shape[:2]
            or k_new.shape[3] != self.head_dim
            or k_new.shape != v_new.shape
        ):
            raise ValueError(
                f"SlimKV.append: new keys {tuple(k_new.shape)} / values {tuple(v_new.shape)} "
                f"do not fit a tail {tuple(self.k_tail.shape)}"
            )
        return replace(
            self,
            k_tail=torch.cat([self.k_tail, k_new.to(self.k_tail.dtype)], dim=2),
            v_tail=torch.cat([self.v_tail, v_new.to(self.v_tail.dtype)], dim=2),
        )

    def drop_tail(self, count: int) -> SlimKV:
        """The same cache without the last ``count`` tail tokens (0 <= count <= T)."""
        if not 0 <= count <= self.tail_len:
            raise ValueError(f"SlimKV.drop_tail: cannot drop {count} of {self.tail_len} tail tokens")
        keep = self.tail_len - count
        return replace(
            self, k_tail=self.k_tail[:, :, :keep].contiguous(), v_tail=self.v_tail[:, :, :keep].contiguous()
        )

    def stored_bytes(self) -> int:
        """Bytes of every tensor this cache holds (measured, metadata included)."""
        return storage_bytes(
            self.k_packed, self.v_packed, self.offsets, self.lengths, self.k_tail, self.v_tail
        )


def storage_bytes(*tensors: Tensor) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a view counts its whole storage, once)."""
    storages = {(t.device, t.untyped_storage().data_ptr()): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def check_decode_inputs(q: Tensor, kv: SlimKV) -> None:
    """Raise ``ValueError`` unless q [B, H, n, D] can attend to ``kv`` (shared by kernel and reference)."""
    if q.dim() != 4:
        raise ValueError(f"slim decode: q must be [B, H, n, D], got {tuple(q.shape)}")
    batch, heads, n, dim = q.shape
    if (batch, dim) != (kv.batch_size, kv.head_dim):
        raise ValueError(
            f"slim decode: q {tuple(q.shape)} does not match the cache tail {tuple(kv.k_tail.shape)}"
        )
    if heads % kv.num_kv_heads:
        raise ValueError(f"slim decode: {heads} query heads are not a multiple of {kv.num_kv_heads} KV heads")
    if not 1 <= n <= kv.tail_len:
        raise ValueError(
            f"slim decode: {n} queries need their own {n} tokens in the tail, which holds {kv.tail_len} "
            "(append the new keys/values before attending)"
        )
    if kv.k_packed.shape[-1] != dim or kv.k_packed.shape != kv.v_packed.shape:
        raise ValueError(
            f"slim decode: packed keys {tuple(kv.k_packed.shape)} / values {tuple(kv.v_packed.shape)}"
        )
    if kv.offsets.shape != (batch, kv.num_kv_heads) or kv.lengths.shape != kv.offsets.shape:
        raise ValueError(f"slim decode: offsets/lengths must be [B, Hkv] = {(batch, kv.num_kv_heads)}")
