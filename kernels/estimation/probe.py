"""Row probe: the exact block distribution of one query row per query block, mixed into Ahat.

Composite tokens score a tile by exp(scale * qmean . kmean), the exponential of its mean score, a
lower bound (Jensen) of the tile's mean exp(score) that is loosest where scores spread widely inside
the tile. On Gemma 3's sliding-window heads (scores spread over ~+-60 in a 16 x 16 tile) that bound
puts 0.99+ of a block's mass on the diagonal block where the exact mass is 0.2-0.45, so the lazy rule
fires on blocks that attend across their whole window. The probe measures, exactly, one row per query
block (its last real row) and the estimate becomes the mean of the two distributions: a block is lazy
only when both its composite estimate and its probe row keep tau on the local path, and blocks the
probe row needs are ranked by at least half its mass on them.

Cost: Sq / block_size rows of exact scores (1/block_size of dense attention's QK^T), chunked. On CUDA
without a mask `with_row_probe` runs the fused kernel of ``triton_probe`` instead (same result up to
rounding; no [rows, Skv] score matrix), this module's `probe_block_mass` being its reference.
"""

from __future__ import annotations

import torch

from ..masks import mask_bias
from ..softcap import soft_cap
from . import triton_probe


@torch.no_grad()
def probe_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    block_size: int,
    chunk_elements: int = 1 << 26,
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """float32 [B, H, nq, nk]: exact attention mass on each key block of query block i's last real row.

    q: [B, H, Sq, D]; k: [B, Hkv, Skv, D] (GQA by h // (H // Hkv)); attn_mask None, bool or additive,
    broadcastable to [B, H, Sq, Skv] (checked by the caller); ``window``: causal sliding window (``masks``);
    ``softcap``: logit soft-cap of the scores (`softcap` module; exact). A row that sees no key gets zeros.
    Rows are scored in chunks of at most ``chunk_elements`` scores (B * H * rows * Skv; 256 MiB fp32
    by default: three chunks at 32K tokens and 9 heads), so the probe costs a few launches.
    """
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    nq, nk = -(-q_len // block_size), -(-kv_len // block_size)
    rows = (torch.arange(1, nq + 1, device=q.device) * block_size).clamp(max=q_len) - 1
    keys = k.float().transpose(-1, -2).unsqueeze(2)  # [B, Hkv, 1, D, Skv]
    k_pos = torch.arange(nk * block_size, device=q.device).view(1, 1, 1, -1)
    out = torch.empty(batch, heads, nq, nk, dtype=torch.float32, device=q.device)
    query_chunk = max(1, chunk_elements // (batch * heads * nk * block_size))
    for i0 in range(0, nq, query_chunk):
        chunk_rows = rows[i0 : i0 + query_chunk]
        q_rows = q[:, :, chunk_rows].float().view(batch, kv_heads, heads // kv_heads, -1, dim)
        scores = soft_cap(torch.matmul(q_rows, keys).view(batch, heads, -1, kv_len) * scale, softcap)
        scores = torch.nn.functional.pad(scores, (0, nk * block_size - kv_len))
        scores = scores + mask_bias(
            attn_mask, is_causal, q_len, kv_len, chunk_rows.view(1, 1, -1, 1), k_pos, window=window
        )
        row_max = scores.amax(-1, keepdim=True)
        seen = torch.isfinite(row_max)
        probs = torch.exp(scores - torch.where(seen, row_max, 0.0))
        probs = probs / torch.where(seen, probs.sum(-1, keepdim=True), 1.0)
        out[:, :, i0 : i0 + query_chunk] = probs.view(*probs.shape[:3], nk, block_size).sum(-1)
    return out


def with_row_probe(
    ahat: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    block_size: int,
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """(ahat + probe) / 2 where the probe row sees a key, else ahat: float32 [B, H, nq, nk], a
    distribution over the allowed blocks wherever ahat is one (the probe row's keys are allowed).
    On CUDA, where `triton_probe` takes the inputs, its kernels probe and mix in one go, writing the
    result into a contiguous ``ahat`` (the callers' fresh estimate); elsewhere `probe_block_mass`."""
    if q.is_cuda and triton_probe.supported(q, k, attn_mask) is None:
        return triton_probe.probe_block_mass_triton(
            q, k, is_causal, scale, block_size, window=window, softcap=softcap, ahat=ahat.contiguous()
        )
    probe = probe_block_mass(q, k, attn_mask, is_causal, scale, block_size, window=window, softcap=softcap)
    seen = probe.sum(-1, keepdim=True) > 0
    return torch.where(seen, (ahat + probe) * 0.5, ahat)
