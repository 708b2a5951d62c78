"""Dense attention with SDPA semantics: what the op runs when the sparse method does not.

Imported by `omnicompile.method` and `omnicompile.ops` alike (it imports neither), so the op's
registration and the method share one dense path without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

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
# Scores per query chunk of `score_chunks` (B * H * rows * Skv; 256 MiB in fp32).
_SCORE_CHUNK_ELEMENTS = 1 << 26


def with_window(
    q: Tensor, k: Tensor, attn_mask: Tensor | None, is_causal: bool, window: int | None
) -> tuple[Tensor | None, bool]:
    """``(attn_mask, is_causal)`` with a window materialised as its bool `window_mask` [Sq, Skv]."""
    if window is None:
        return attn_mask, is_causal
    return window_mask(q.shape[2], k.shape[2], window, q.device), False


def _position_bias(
    q: Tensor, k: Tensor, attn_mask: Tensor | None, is_causal: bool, window: int | None
) -> Callable[[Tensor], Tensor]:
    """``bias(rows)`` for `score_chunks`: the mask, causality and window as `masks.mask_bias` of the
    query rows ``rows`` (int64 [n]) against every key."""

    def bias(rows: Tensor) -> Tensor:
        k_pos = torch.arange(k.shape[2], device=q.device).view(1, 1, 1, -1)
        return mask_bias(
            attn_mask, is_causal, q.shape[2], k.shape[2], rows.view(1, 1, -1, 1), k_pos, window=window
        )

    return bias


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
    need_lse: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """(out, lse): SDPA (out in the layout SDPA returns); on CUDA with cuDNN attention first in
    priority. A window runs as SDPA with its materialised mask (`with_window`); a soft-capped call as
    `capped_attention` with the mask, causality and window as `masks.mask_bias`.

    ``lse``: float32 [B, H, Sq] (`capped_attention`'s, which costs nothing more; else `dense_lse`, an
    extra pass over the scores) when ``need_lse``, else None.
    """
    bias = _position_bias(q, k, attn_mask, is_causal, window)
    resolved = resolve_scale(scale, q.shape[-1])
    if softcap is not None:
        return capped_attention(q, k, v, resolved, softcap, bias)
    lse = dense_lse(q, k, resolved, bias) if need_lse else None
    attn_mask, is_causal = with_window(q, k, attn_mask, is_causal, window)
    if q.device.type != "cuda":
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )
        return out, lse
    with sdpa_kernel(_DENSE_BACKENDS, set_priority=True):
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )
    return out, lse


def score_chunks(
    q: Tensor, k: Tensor, scale: float, softcap: float | None, bias: Callable[[Tensor], Tensor]
) -> Iterator[tuple[Tensor, Tensor]]:
    """The fp32 scores of q [B, H, Sq, D] against k [B, Hkv, Skv, D] (H a multiple of Hkv) by query
    chunks of at most ``_SCORE_CHUNK_ELEMENTS`` scores: per chunk ``(safe, lse)``.

    Scores s = scale * q . k, soft-capped to softcap * tanh(s / softcap) if ``softcap``, plus
    ``bias(rows)`` (fp32 [Bm, Hm, n, Skv], 0 keep, -inf masked, for the query rows ``rows``, int64 [n]).
    ``lse`` [B, H, n, 1]: their natural-log log-sum-exp, -inf for a row that sees no key; ``safe``
    [B, H, n, Skv]: the scores with such rows set to 0, so that ``exp(safe - lse)`` (the softmax) and its
    gradient stay finite (a row that sees no key must be zeroed by the caller).
    """
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    keys = k.float().transpose(-1, -2).unsqueeze(2)  # [B, Hkv, 1, D, Skv]
    rows = max(1, _SCORE_CHUNK_ELEMENTS // (batch * heads * kv_len))
    for r0 in range(0, q_len, rows):
        chunk = q[:, :, r0 : r0 + rows].float()
        n = chunk.shape[2]
        scores = (torch.matmul(chunk.view(batch, kv_heads, group, n, dim), keys) * scale).view(
            batch, heads, n, kv_len
        )
        if softcap is not None:
            scores = soft_cap(scores, softcap)
        scores = scores + bias(torch.arange(r0, r0 + n, device=q.device))
        seen = torch.isfinite(scores.amax(-1, keepdim=True))
        safe = torch.where(seen, scores, 0.0)
        yield safe, torch.where(seen, torch.logsumexp(safe, -1, keepdim=True), float("-inf"))


def dense_lse(q: Tensor, k: Tensor, scale: float, bias: Callable[[Tensor], Tensor]) -> Tensor:
    """float32 [B, H, Sq]: the log-sum-exp of `score_chunks` (no cap) per query row (-inf: the row sees
    no key).

    Why not the fused kernels' own: SDPA returns no lse; the aten ops that do
    (``_scaled_dot_product_flash_attention[_for_cpu]``, ``_efficient_attention``, cuDNN) each take a
    different subset of masks, GQA, head dims and dtypes, and would replace SDPA's backend choice for
    ``out``. This pass is exact (fp32 math, the same masking as the sparse path: additive values
    <= ``finfo.min / 2`` count as masked) for every input the op takes, costs about one score product
    more than attention, and runs only where the caller reads the lse.
    """
    return torch.cat([lse.squeeze(-1) for _, lse in score_chunks(q, k, scale, None, bias)], 2)


def capped_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: float, bias: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """Exact logit soft-capped attention (Gemma 2): (out [B, H, Sq, Dv] in q.dtype, contiguous, lse
    float32 [B, H, Sq]).

    q: [B, H, Sq, D]; k, v: [B, Hkv, Skv, D / Dv] (H a multiple of Hkv); ``bias(rows)``: the fp32
    additive bias [Bm, Hm, n, Skv] (0 keep, -inf masked) of the query rows ``rows`` (int64 [n]).
    Scores s = scale * q . k become softcap * tanh(s / softcap), then the bias is added and the
    softmax taken (transformers' order), over `score_chunks`, so no [Sq, Skv] matrix is held for every
    head at once; differentiable by autograd in ``out``. A row that sees no key gives 0 (SDPA's math
    backend does the same) and lse -inf.

    Why not SDPA or FlexAttention: SDPA has no score hook. FlexAttention's ``score_mod`` expresses the
    cap, but run eagerly it is a math reference that materialises all [B, H, Sq, Skv] scores, and
    compiled it would put a ``torch.compile`` inside the op (in every graph and AOTInductor package
    the op is part of), with the mask rewritten as a ``mask_mod`` closure. The chunks take every
    input the op accepts (any mask, GQA, a window, Dv != D) on every device.
    """
    batch, heads, _, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    values = v.float().unsqueeze(2)  # [B, Hkv, 1, Skv, Dv]
    outs, lses = [], []
    for safe, lse in score_chunks(q, k, scale, softcap, bias):
        seen = torch.isfinite(lse)
        probs = torch.where(seen, torch.exp(safe - torch.where(seen, lse, 0.0)), 0.0)
        n = probs.shape[2]
        outs.append(
            torch.matmul(probs.view(batch, kv_heads, heads // kv_heads, n, kv_len), values).flatten(1, 2)
        )
        lses.append(lse.squeeze(-1))
    return torch.cat(outs, 2).to(q.dtype).contiguous(), torch.cat(lses, 2)
