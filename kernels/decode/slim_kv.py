"""`SlimKV`: the ragged key/value layout of one slimmed attention layer (METHOD.md section 4).

Each (batch row b, KV head h) keeps its own number of prompt tokens. The kept prompt tokens are stored
packed, segment after segment in (b, h) order, in one flat ``[N, D]`` buffer for keys and one for
values: nothing is padded to the longest head. Tokens that arrive after slimming (generated tokens) are
appended to every head, so they form a rectangular *tail*: the first T of ``C`` slots ``[B, Hkv, C, D]``,
T held on the device (``tail_length``), so neither attention nor an append reads it on the host.
Two kinds of tail:
- growing (``pack(..., capacity=None)``): C == T always; `append` concatenates (new tensors, like
  transformers' `DynamicCache`), so the host knows T (`tail_len`);
- static (``pack(..., capacity=C)``): C slots preallocated; `append` writes the new tokens in place at
  slot T and adds to T in place, so a decode step has static shapes and addresses and no host read
  (what a CUDA graph replay needs); the host does not know T (`tail_len` is None).

Causality of a decode step with n >= 1 new queries (the n new tokens are the last n tail entries):
query j (0-based among the n) attends to every kept prompt token of its KV head (all of them lie in
its past) and to tail positions t <= T - n + j. With n = 1 the query sees the whole slim cache.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


def host_readable(t: Tensor) -> bool:
    """Whether the host may read ``t`` now: not while Dynamo traces nor while a CUDA graph captures."""
    return not torch.compiler.is_compiling() and not (t.is_cuda and torch.cuda.is_current_stream_capturing())


@dataclass(frozen=True)
class SlimKV:
    """Slimmed keys and values of one layer.

    Attributes:
        k_packed, v_packed: [N, D], kept prompt keys/values of every (b, h) segment, concatenated.
        offsets: int32 [B, Hkv], first row of segment (b, h) in the packed buffers.
        lengths: int32 [B, Hkv], kept prompt tokens of segment (b, h).
        max_length: host copy of ``lengths.max()`` (0 when empty), for launch geometry without a sync.
        k_tail, v_tail: [B, Hkv, C, D], C tail slots; the first T hold the tokens appended after slimming
            (the same for every head).
        tail_length: int32 0-d tensor on the cache's device, T (0 <= T <= C).
        static: whether the tail is static (C slots preallocated, written in place) or growing (C == T).
    """

    k_packed: Tensor
    v_packed: Tensor
    offsets: Tensor
    lengths: Tensor
    max_length: int
    k_tail: Tensor
    v_tail: Tensor
    tail_length: Tensor
    static: bool

    @property
    def batch_size(self) -> int:
        return self.k_tail.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k_tail.shape[1]

    @property
    def capacity(self) -> int:
        """C, the tail slots."""
        return self.k_tail.shape[2]

    @property
    def tail_len(self) -> int | None:
        """T on the host: C for a growing tail (always full), None for a static one (on the device only)."""
        return None if self.static else self.capacity

    @property
    def head_dim(self) -> int:
        return self.k_tail.shape[3]

    @classmethod
    def pack(cls, k: Tensor, v: Tensor, keep: Tensor, capacity: int | None = None) -> SlimKV:
        """Pack the kept tokens of dense prompt keys/values; the tail starts empty.

        Args:
            k, v: [B, Hkv, S, D] prompt keys/values.
            keep: bool [B, Hkv, S], True where token s is kept for (b, h).
            capacity: None for a growing tail, else the C >= 1 slots of a static tail (zeros).
        """
        if capacity is not None and capacity < 1:
            raise ValueError(f"SlimKV.pack: a static tail needs capacity >= 1, got {capacity}")
        if keep.shape != k.shape[:3] or k.shape != v.shape:
            raise ValueError(
                f"SlimKV.pack: keep {tuple(keep.shape)} does not match k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        b, h, s = keep.nonzero(as_tuple=True)  # row-major: segments in (b, h) order, tokens ascending
        lengths = keep.sum(-1, dtype=torch.int32)
        offsets = (lengths.flatten().cumsum(0, dtype=torch.int32) - lengths.flatten()).view_as(lengths)
        tail = k.new_zeros(k.shape[0], k.shape[1], capacity or 0, k.shape[3])
        return cls(
            k_packed=k[b, h, s].contiguous(),
            v_packed=v[b, h, s].contiguous(),
            offsets=offsets,
            lengths=lengths,
            max_length=int(lengths.max()) if lengths.numel() else 0,
            k_tail=tail,
            v_tail=tail.clone(),
            tail_length=torch.zeros((), dtype=torch.int32, device=k.device),
            static=capacity is not None,
        )

    def append(self, k_new: Tensor, v_new: Tensor) -> SlimKV:
        """The cache with ``k_new``, ``v_new`` [B, Hkv, n, D] appended to every head's tail: a new
        `SlimKV` for a growing tail; ``self``, written in place at slot T (T += n), for a static one.

        A static tail without room for n more tokens raises ``ValueError`` where the host may read T
        (`host_readable`); while traced or captured the write's index check fails instead (on CUDA a
        device-side assert), never a silent overwrite.
        """
        if (
            k_new.shape[:2] != self.k_tail.shape[:2]
            or k_new.shape[3] != self.head_dim
            or k_new.shape != v_new.shape
        ):
            raise ValueError(
                f"SlimKV.append: new keys {tuple(k_new.shape)} / values {tuple(v_new.shape)} "
                f"do not fit a tail {tuple(self.k_tail.shape)}"
            )
        n = k_new.shape[2]
        if not self.static:
            return replace(
                self,
                k_tail=torch.cat([self.k_tail, k_new.to(self.k_tail.dtype)], dim=2),
                v_tail=torch.cat([self.v_tail, v_new.to(self.v_tail.dtype)], dim=2),
                tail_length=self.tail_length + n,
            )
        if host_readable(self.tail_length) and int(self.tail_length) + n > self.capacity:
            raise ValueError(
                f"SlimKV.append: the static tail is full: {int(self.tail_length)} of {self.capacity} slots "
                f"used, {n} more tokens (build the cache with a larger decode capacity)"
            )
        slots = (torch.arange(n, device=self.k_tail.device) + self.tail_length).long()
        self.k_tail.index_copy_(2, slots, k_new.to(self.k_tail.dtype))
        self.v_tail.index_copy_(2, slots, v_new.to(self.v_tail.dtype))
        self.tail_length.add_(n)
        return self

    def drop_tail(self, count: int) -> SlimKV:
        """The cache without its last ``count`` tail tokens (0 <= count <= T): a new `SlimKV` for a
        growing tail; ``self`` (T -= count in place; reads T on the host) for a static one."""
        length = self.capacity if not self.static else int(self.tail_length)
        if not 0 <= count <= length:
            raise ValueError(f"SlimKV.drop_tail: cannot drop {count} of {length} tail tokens")
        if self.static:
            self.tail_length.sub_(count)
            return self
        keep = length - count
        return replace(
            self,
            k_tail=self.k_tail[:, :, :keep].contiguous(),
            v_tail=self.v_tail[:, :, :keep].contiguous(),
            tail_length=self.tail_length - count,
        )

    def tensors(self) -> tuple[Tensor, ...]:
        """Every tensor of the cache: packed keys, values, offsets, lengths, tail keys, values, T."""
        packed = (self.k_packed, self.v_packed, self.offsets, self.lengths)
        return (*packed, self.k_tail, self.v_tail, self.tail_length)

    def stored_bytes(self) -> int:
        """Bytes of every tensor this cache holds (measured, metadata included)."""
        return storage_bytes(*self.tensors())


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
    if not 1 <= n <= kv.capacity:
        raise ValueError(
            f"slim decode: {n} queries need their own {n} tokens in the tail, which holds {kv.capacity} "
            "(append the new keys/values before attending)"
        )
    if kv.k_packed.shape[-1] != dim or kv.k_packed.shape != kv.v_packed.shape:
        raise ValueError(
            f"slim decode: packed keys {tuple(kv.k_packed.shape)} / values {tuple(kv.v_packed.shape)}"
        )
    if kv.offsets.shape != (batch, kv.num_kv_heads) or kv.lengths.shape != kv.offsets.shape:
        raise ValueError(f"slim decode: offsets/lengths must be [B, Hkv] = {(batch, kv.num_kv_heads)}")
    if kv.tail_length.shape != () or kv.tail_length.dtype != torch.int32:
        raise ValueError(
            f"slim decode: tail_length must be a 0-d int32 tensor, got {kv.tail_length.dtype} "
            f"{tuple(kv.tail_length.shape)}"
        )
