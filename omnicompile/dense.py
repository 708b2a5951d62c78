"""Dense attention with SDPA semantics: what the op runs when the sparse method does not.

Imported by `omnicompile.method` and `omnicompile.ops` alike (it imports neither), so the op's
registration and the method share one dense path without an import cycle.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .kernels.masks import window_mask

# Dense attention prefers cuDNN on CUDA (the fastest dense kernel on Hopper), then SDPA's usual order.
_DENSE_BACKENDS = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


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
) -> Tensor:
    """SDPA (contiguous output); on CUDA with cuDNN attention first in priority. A window runs as
    SDPA with its materialised mask (`with_window`)."""
    attn_mask, is_causal = with_window(q, k, attn_mask, is_causal, window)
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        ).contiguous()
    with sdpa_kernel(_DENSE_BACKENDS, set_priority=True):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        ).contiguous()
