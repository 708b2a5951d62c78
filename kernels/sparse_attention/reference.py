"""Block-sparse attention over a `BlockSelection`: the pure-PyTorch reference every kernel is checked against.

fp32 math, chunked over query blocks: each chunk gathers its selected key blocks (trimmed to the
chunk's largest count), so memory is B * H * query_chunk * block_size * (max count * block_size) and
no [Sq, Skv] matrix is built. Differentiable by autograd with respect to q, k, v (the selection is a
constant): autograd's backward is the reference of `triton_bwd.sparse_attention_backward`. Trimming
reads the chunk's largest count on the host: one synchronisation per chunk, which the reference
accepts and the kernels avoid.
"""

from __future__ import annotations

import torch

from ..masks import check_qkv, check_window, mask_bias, resolve_scale, validate_mask
from ..selection.block_selection import BlockSelection
from ..softcap import check_softcap, soft_cap


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    query_chunk: int = 16,
    *,
    window: int | None = None,
    softcap: float | None = None,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of each query block restricted to its selected key blocks.

    Args:
        q: [B, H, Sq, D]; k: [B, Hkv, Skv, D]; v: [B, Hkv, Skv, Dv] (query head h reads kv head
            h // (H // Hkv)).
        selection: kv_num_blocks / kv_indices over (B, H, nq) for block size b, q_len Sq, kv_len Skv.
        attn_mask: None, bool (True = keep) or additive float, broadcastable to [B, H, Sq, Skv].
        is_causal: top-left causal (as SDPA); exclusive with attn_mask.
        scale: score scale, ``None`` = 1 / sqrt(D).
        query_chunk: query blocks processed at once.
        window: causal sliding window (`masks` module docstring): row r sees keys (r - window, r].
        softcap: logit soft-cap (`softcap` module): s = scale * q . k becomes softcap * tanh(s / softcap)
            before the bias is added; None: no cap.

    Returns:
        out: [B, H, Sq, Dv] in q.dtype; softmax over the selected keys (inside the mask, causal and
            sequence bounds) of the (capped) scores scale * q . k plus the bias, times v.
        lse: float32 [B, H, Sq], log-sum-exp of those scores. Rows with no such key: out 0, lse -inf.

    Checks q, k, v, the mask, the window and the cap (``ValueError``) unless ``check=False`` (inputs
    its caller has checked: ``method.AttentionInputs``).
    """
    if check:
        batch, heads, _, q_len, kv_len = check_qkv(q, k, v)
        validate_mask(attn_mask, is_causal, batch, heads, q_len, kv_len)
        check_window(window, is_causal, attn_mask)
        check_softcap(softcap)
    batch, heads, q_len = q.shape[:3]
    kv_heads, kv_len = k.shape[1], k.shape[2]
    b = selection.block_size
    nq, nk = -(-q_len // b), -(-kv_len // b)
    if (selection.q_len, selection.kv_len) != (q_len, kv_len) or selection.kv_indices.shape != (
        batch,
        heads,
        nq,
        nk,
    ):
        raise ValueError(
            f"selection (q_len {selection.q_len}, kv_len {selection.kv_len}, indices "
            f"{tuple(selection.kv_indices.shape)}) does not match q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if query_chunk < 1:
        raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")
    scale = resolve_scale(scale, q.shape[-1])
    # One zero block past the end, so that index nk (padding) gathers harmlessly.
    k_blocks = torch.nn.functional.pad(k.float(), (0, 0, 0, (nk + 1) * b - kv_len)).unflatten(2, (nk + 1, b))
    v_blocks = torch.nn.functional.pad(v.float(), (0, 0, 0, (nk + 1) * b - kv_len)).unflatten(2, (nk + 1, b))
    q_blocks = torch.nn.functional.pad(q.float(), (0, 0, 0, nq * b - q_len)).unflatten(2, (nq, b))
    batch_index = torch.arange(batch, device=q.device).view(batch, 1, 1, 1)
    kv_head_index = (torch.arange(heads, device=q.device) // (heads // kv_heads)).view(1, heads, 1, 1)
    outs, lses = [], []
    for i0 in range(0, nq, query_chunk):
        i1 = min(i0 + query_chunk, nq)
        counts = selection.kv_num_blocks[:, :, i0:i1].long()
        width = max(int(counts.max()), 1)
        slots = torch.arange(width, device=q.device)
        index = selection.kv_indices[:, :, i0:i1, :width].long().clamp(0, nk)
        index = torch.where(slots < counts.unsqueeze(-1), index, nk)
        keys = k_blocks[batch_index, kv_head_index, index].flatten(3, 4)  # [B, H, C, width*b, D]
        values = v_blocks[batch_index, kv_head_index, index].flatten(3, 4)
        q_pos = (i0 * b + torch.arange((i1 - i0) * b, device=q.device)).view(1, 1, i1 - i0, b, 1)
        k_pos = (index.unsqueeze(-1) * b + torch.arange(b, device=q.device)).flatten(3, 4).unsqueeze(3)
        scores = soft_cap(torch.matmul(q_blocks[:, :, i0:i1], keys.transpose(-1, -2)) * scale, softcap)
        scores = scores + mask_bias(attn_mask, is_causal, q_len, kv_len, q_pos, k_pos, window=window)
        row_max = scores.detach().amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
        weights = torch.exp(scores - row_max)
        total = weights.sum(dim=-1, keepdim=True)
        seen = total > 0
        total = torch.where(seen, total, 1.0)
        outs.append(torch.matmul(weights, values) / total)
        lses.append(torch.where(seen, row_max + torch.log(total), float("-inf")).squeeze(-1))
    out = torch.cat(outs, dim=2).flatten(2, 3)[:, :, :q_len]
    lse = torch.cat(lses, dim=2).view(batch, heads, nq * b)[:, :, :q_len]
    return out.to(q.dtype), lse
