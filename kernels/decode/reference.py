"""Pure-PyTorch reference of decode attention over a slim (ragged) KV cache, fp32 math: the reference
of `triton_decode` (the same `slim_decode`).

Semantics (see `SlimKV` for the layout and the causality of n > 1 queries): query head ``h`` of
batch row ``b`` attends to the kept prompt tokens of KV head ``h // G`` followed by the tail tokens it
may see, with softmax over exactly those keys.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .slim_kv import SlimKV, check_decode_inputs


def slim_decode(q: Tensor, kv: SlimKV, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Decode attention of a few queries against a slim cache.

    Args:
        q: [B, H, n, D] fp16/bf16/fp32, the n newest tokens' queries (their keys are the last n tail entries).
        kv: the layer's `SlimKV` (Hkv KV heads, H % Hkv == 0); its first ``kv.tail_length`` tail slots
            are read, the last n of them the queries' own tokens.
        scale: score scale, default 1/sqrt(D).

    Returns:
        out [B, H, n, D] in q's dtype and lse float32 [B, H, n] (natural log-sum-exp of the scaled scores).
    """
    check_decode_inputs(q, kv)
    batch, heads, n, dim = q.shape
    group = heads // kv.num_kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    tail = int(kv.tail_length)  # T, read from the device (the kernel reads it there)
    if not n <= tail <= kv.capacity:
        raise ValueError(
            f"slim decode: {n} queries need their own {n} tokens in the tail, which holds {tail} "
            f"of {kv.capacity} slots (append the new keys/values before attending)"
        )
    # Query j may see tail positions t <= tail - n + j; every kept prompt token is visible.
    tail_visible = (
        torch.arange(tail, device=q.device)[None, :] <= (tail - n + torch.arange(n, device=q.device))[:, None]
    )
    out = torch.empty(batch, heads, n, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, heads, n, dtype=torch.float32, device=q.device)
    segments = zip(kv.offsets.flatten().tolist(), kv.lengths.flatten().tolist())
    for segment, (start, length) in enumerate(segments):
        b, h = divmod(segment, kv.num_kv_heads)
        keys = torch.cat([kv.k_packed[start : start + length], kv.k_tail[b, h, :tail]]).float()  # [L, D]
        values = torch.cat([kv.v_packed[start : start + length], kv.v_tail[b, h, :tail]]).float()
        visible = torch.cat([tail_visible.new_ones(n, length), tail_visible], dim=1)  # [n, L]
        heads_of_group = slice(h * group, (h + 1) * group)
        scores = (q[b, heads_of_group].float() @ keys.T) * scale  # [G, n, L]
        scores = scores.masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # [G, n]
        out[b, heads_of_group] = torch.exp(scores - row_lse[..., None]) @ values
        lse[b, heads_of_group] = row_lse
    return out.to(q.dtype), lse
