"""Dense attention with SDPA semantics: what the op runs when the sparse method does not.

Imported by `omnicompile.method` and `omnicompile.ops` alike (it imports neither), so the op's
registration and the method share one dense path without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .kernels.masks import mask_bias, resolve_scale, window_mask
from .kernels.softcap import soft_cap

# Dense attention prefers cuDNN on CUDA (the fastest dense kernel on Hopper), then SDPA's usual order.
_DENSE_BACKENDS = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]
# Scores per query chunk of `capped_attention` (B * H * rows * Skv; 256 MiB in fp32).
_CAPPED_CHUNK_ELEMENTS = 1 << 26


def with_window(
    q: Tensor, k: Tensor, attn_mask: Tensor | None, is_causal: bool, window: int | None
) -> tuple[Tensor | None, bool]:
    """``(attn_mask, is_causal)`` with a window materialised as its bool `window_mask` [Sq, Skv]."""
    if window is None:
        return attn_mask, is_causal
    return window_mask(q.shape[2], k.shape[2], window, q.device), False


def dense_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    window: int | None = None,
    softcap: float | None = None,
) -> Tensor:
    """SDPA (contiguous output); on CUDA with cuDNN attention first in priority. A window runs as
    SDPA with its materialised mask (`with_window`); a soft-capped call as `capped_attention` with the
    mask, causality and window as `masks.mask_bias`."""
    if softcap is not None:
        k_pos = torch.arange(k.shape[2], device=q.device).view(1, 1, 1, -1)

        def bias(rows: Tensor) -> Tensor:
            q_pos = rows.view(1, 1, -1, 1)
            return mask_bias(attn_mask, is_causal, q.shape[2], k.shape[2], q_pos, k_pos, window=window)

        return capped_attention(q, k, v, resolve_scale(scale, q.shape[-1]), softcap, bias)
    attn_mask, is_causal = with_window(q, k, attn_mask, is_causal, window)
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        ).contiguous()
    with sdpa_kernel(_DENSE_BACKENDS, set_priority=True):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        ).contiguous()


def capped_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: float, bias: Callable[[Tensor], Tensor]
) -> Tensor:
    """Exact logit soft-capped attention (Gemma 2), [B, H, Sq, Dv] in q.dtype, contiguous.

    q: [B, H, Sq, D]; k, v: [B, Hkv, Skv, D / Dv] (H a multiple of Hkv); ``bias(rows)``: the fp32
    additive bias [Bm, Hm, n, Skv] (0 keep, -inf masked) of the query rows ``rows`` (int64 [n]).
    Scores s = scale * q . k become softcap * tanh(s / softcap), then the bias is added and the
    softmax taken (transformers' order). fp32 math over query chunks of at most
    ``_CAPPED_CHUNK_ELEMENTS`` scores, so no [Sq, Skv] matrix is held for every head at once;
    differentiable by autograd. A row that sees no key gives 0 (SDPA's math backend does the same).

    Why not SDPA or FlexAttention: SDPA has no score hook. FlexAttention's ``score_mod`` expresses the
    cap, but run eagerly it is a math reference that materialises all [B, H, Sq, Skv] scores, and
    compiled it would put a ``torch.compile`` inside the op (in every graph and AOTInductor package
    the op is part of), with the mask rewritten as a ``mask_mod`` closure. The chunks take every
    input the op accepts (any mask, GQA, a window, Dv != D) on every device.
    """
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    keys = k.float().transpose(-1, -2).unsqueeze(2)  # [B, Hkv, 1, D, Skv]
    values = v.float().unsqueeze(2)  # [B, Hkv, 1, Skv, Dv]
    rows = max(1, _CAPPED_CHUNK_ELEMENTS // (batch * heads * kv_len))
    outs = []
    for r0 in range(0, q_len, rows):
        chunk = q[:, :, r0 : r0 + rows].float()
        n = chunk.shape[2]
        scores = torch.matmul(chunk.view(batch, kv_heads, group, n, dim), keys) * scale
        scores = soft_cap(scores.view(batch, heads, n, kv_len), softcap)
        scores = scores + bias(torch.arange(r0, r0 + n, device=q.device))
        seen = torch.isfinite(scores.amax(-1, keepdim=True))
        probs = torch.where(seen, torch.softmax(torch.where(seen, scores, 0.0), -1), 0.0)
        outs.append(torch.matmul(probs.view(batch, kv_heads, group, n, kv_len), values).flatten(1, 2))
    return torch.cat(outs, 2).to(q.dtype).contiguous()
