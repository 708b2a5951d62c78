"""The OmniSparse pipeline: estimate, select, attend (METHOD.md sections 1-3 and 5).

The estimator runs in `_estimate` and the attention in `_attend`, one place each, so that a device
dispatch (Triton kernels on CUDA) changes only those two functions. Today both run the pure-PyTorch
references, which take every input the op accepts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import OmniSparseConfig
from .kernels.estimation import estimate_blocks
from .kernels.masks import allowed_blocks, check_qkv, resolve_scale, validate_mask
from .kernels.selection import BlockSelection, select_blocks
from .kernels.sparse_attention.reference import sparse_attention_reference
from .metrics import relative_error
from .metrics import selection_stats as measure_selection


def kernel_unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """Why the attention implementation `_attend` would run cannot take these inputs ("" = it can).

    The pure-PyTorch reference takes every input the op accepts, so this is always "".
    """
    return ""


def _estimate(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    config: OmniSparseConfig,
) -> torch.Tensor:
    """Ahat float32 [B, H, nq, nk] (the one estimator call)."""
    return estimate_blocks(q, k, attn_mask, is_causal, scale, config)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    config: OmniSparseConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, Sq, Dv] in q.dtype, lse float32 [B, H, Sq]) over the selection (the one attention call)."""
    return sparse_attention_reference(q, k, v, selection, attn_mask, is_causal, scale, config.query_chunk)


def plan(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    config: OmniSparseConfig,
) -> BlockSelection:
    """The block selection of METHOD.md sections 1-3 (no gradient flows through it).

    q: [B, H, Sq, D]; k: [B, Hkv, Skv, D]; attn_mask: None, bool or additive, broadcastable to
    [B, H, Sq, Skv]; scale ``None`` = 1 / sqrt(D). Deterministic: recomputing it gives the same selection.
    """
    batch, heads, kv_heads, q_len, kv_len = check_qkv(q, k)
    validate_mask(attn_mask, is_causal, batch, heads, q_len, kv_len)
    scale = resolve_scale(scale, q.shape[-1])
    with torch.no_grad():
        ahat = _estimate(q, k, attn_mask, is_causal, scale, config)
        allowed = allowed_blocks(
            attn_mask, is_causal, batch, heads, q_len, kv_len, config.block_size, q.device
        )
        return select_blocks(ahat, allowed, config, kv_heads, is_causal=is_causal, q_len=q_len, kv_len=kv_len)


def omnisparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    config: OmniSparseConfig,
) -> tuple[torch.Tensor, torch.Tensor, BlockSelection]:
    """OmniSparse attention with SDPA semantics (shapes as `plan`; v: [B, Hkv, Skv, Dv]).

    Returns (out [B, H, Sq, Dv] in q.dtype, lse float32 [B, H, Sq], the selection). Differentiable by
    autograd with respect to q, k, v with the selection held constant (METHOD.md section 5).
    """
    check_qkv(q, k, v)
    selection = plan(q, k, attn_mask, is_causal, scale, config)
    out, lse = _attend(q, k, v, selection, attn_mask, is_causal, resolve_scale(scale, q.shape[-1]), config)
    return out, lse, selection


def omnisparse_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    is_causal: bool,
    scale: float | None,
    config: OmniSparseConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `omnisparse_attention` for the cotangent grad_out [B, H, Sq, Dv].

    Recomputes the (deterministic) selection, then differentiates the sparse attention over exactly
    those blocks with ``torch.func.vjp`` (usable inside a custom op, below the autograd keys). ``out``
    and ``lse`` are the forward's results, accepted for a kernel backward that reuses them; the
    reference recomputes them.
    """
    selection = plan(q, k, attn_mask, is_causal, scale, config)
    scale = resolve_scale(scale, q.shape[-1])

    def attention_out(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
        return _attend(q_, k_, v_, selection, attn_mask, is_causal, scale, config)[0]

    _, vjp_fn = torch.func.vjp(attention_out, q, k, v)
    return vjp_fn(grad_out)


def selection_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    config: OmniSparseConfig,
    selection: BlockSelection,
    out: torch.Tensor,
) -> dict[str, float]:
    """`metrics.SelectionStats` of the selection plus ``rel_error`` of ``out`` against dense SDPA.

    Costs an exact pass (chunked by ``config.query_chunk``) and a dense attention: for explain/benchmarks.
    """
    stats = measure_selection(q, k, attn_mask, is_causal, scale, selection, config.query_chunk).as_dict()
    dense = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return {**stats, "rel_error": relative_error(out, dense)}
