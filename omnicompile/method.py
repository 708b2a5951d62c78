"""The OmniSparse pipeline: estimate, select, attend (METHOD.md sections 1-3 and 5).

Device dispatch lives here, one place each: `_estimate` runs the fused Triton estimator on CUDA
when it takes the inputs (else the reference estimator), `plan` the fused Triton selection on CUDA
(else `select_blocks`), `_attend` the Triton block-sparse kernel
on CUDA (the op checks `kernel_unsupported_reason` first and runs dense attention, logged, when it
cannot), and the backward the Triton backward kernels on CUDA. On the CPU everything runs the
pure-PyTorch references, which take every input the op accepts.

On CUDA a selection denser than ``config.dense_fallback_density`` runs dense attention instead
(`density_fallback_reason`): at that density the sparse kernel cannot beat a dense one. Deciding
costs one host synchronisation per call (a scalar read of the selection's size).

``window`` (TEAM.md "Sliding windows": only with ``is_causal=True`` and no mask) goes to every
estimator, mask, reference and kernel call as ``window=``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import OmniSparseConfig
from .dense import dense_attention, with_window
from .kernels.estimation import estimate_blocks, triton_composite
from .kernels.masks import allowed_blocks, check_qkv, resolve_scale, validate_mask
from .kernels.selection import BlockSelection, select_blocks, triton_select
from .kernels.selection.transpose import selection_from_block_mask
from .kernels.sparse_attention import triton_bwd, triton_fwd
from .kernels.sparse_attention.reference import sparse_attention_reference
from .metrics import relative_error
from .metrics import selection_stats as measure_selection


def kernel_unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
) -> str:
    """Why `_attend` cannot take these inputs ("" = it can): CUDA inputs the Triton kernel rejects.

    The pure-PyTorch reference (CPU) takes every input the op accepts.
    """
    if q.device.type != "cuda":
        return ""
    reason = triton_fwd.supported(q, k, v, attn_mask)
    return f"Triton prefill kernel: {reason}" if reason else ""


def _estimate(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    config: OmniSparseConfig,
    window: int | None = None,
) -> torch.Tensor:
    """Ahat float32 [B, H, nq, nk] (the one estimator call)."""
    if q.device.type == "cuda" and triton_composite.supported(q, k, attn_mask, config) is None:
        return triton_composite.estimate_blocks(q, k, attn_mask, is_causal, scale, config, window=window)
    return estimate_blocks(q, k, attn_mask, is_causal, scale, config, window=window)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    config: OmniSparseConfig,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, Sq, Dv] in q.dtype, lse float32 [B, H, Sq]) over the selection (the one attention call)."""
    if q.device.type == "cuda":
        return triton_fwd.sparse_attention_fwd(q, k, v, selection, attn_mask, is_causal, scale, window=window)
    return sparse_attention_reference(
        q, k, v, selection, attn_mask, is_causal, scale, config.query_chunk, window=window
    )


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, window: int, block_size: int
) -> torch.Tensor | None:
    """Exact causal sliding-window attention [B, H, Sq, Dv] (q.dtype): the Triton kernel over every block
    the band touches, O(Sq * window) work where SDPA with the materialised mask does O(Sq * Skv) and
    allocates the [Sq, Skv] mask. None where the kernel cannot take the inputs (`triton_fwd.supported`)."""
    if triton_fwd.supported(q, k, v, None) is not None:
        return None
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    band = allowed_blocks(None, True, batch, heads, q_len, kv_len, block_size, q.device, window=window)
    selection = selection_from_block_mask(band.expand(batch, heads, -1, -1), block_size, q_len, kv_len)
    scale = resolve_scale(scale, q.shape[-1])
    return triton_fwd.sparse_attention_fwd(q, k, v, selection, None, True, scale, window=window)[0]


def select_on_device(
    ahat: torch.Tensor,
    allowed: torch.Tensor,
    config: OmniSparseConfig,
    num_kv_heads: int,
    *,
    is_causal: bool,
    q_len: int,
    kv_len: int,
) -> BlockSelection:
    """The selection of `select_blocks` (the one selection call): the fused Triton kernel on CUDA."""
    if ahat.device.type == "cuda" and triton_select.supported(ahat, allowed) is None:
        return triton_select.select_blocks_triton(
            ahat, allowed, config, num_kv_heads, is_causal=is_causal, q_len=q_len, kv_len=kv_len
        )
    return select_blocks(ahat, allowed, config, num_kv_heads, is_causal=is_causal, q_len=q_len, kv_len=kv_len)


def density_fallback_reason(
    selection: BlockSelection,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    config: OmniSparseConfig,
    window: int | None = None,
) -> str:
    """On CUDA, why this selection runs dense attention ("" = sparse): denser than the config allows."""
    if selection.kv_indices.device.type != "cuda" or config.dense_fallback_density >= 1.0:
        return ""
    batch, heads = selection.kv_num_blocks.shape[:2]
    allowed = allowed_blocks(
        attn_mask,
        is_causal,
        batch,
        heads,
        selection.q_len,
        selection.kv_len,
        selection.block_size,
        selection.kv_indices.device,
        window=window,
    )
    allowed_count = allowed.expand(batch, heads, -1, -1).sum()
    density = (selection.kv_num_blocks.sum() / allowed_count).item()
    if density > config.dense_fallback_density:
        return f"selection density {density:.2f} > dense_fallback_density {config.dense_fallback_density}"
    return ""


def plan(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    config: OmniSparseConfig,
    window: int | None = None,
) -> BlockSelection:
    """The block selection of METHOD.md sections 1-3 (no gradient flows through it).

    q: [B, H, Sq, D]; k: [B, Hkv, Skv, D]; attn_mask: None, bool or additive, broadcastable to
    [B, H, Sq, Skv]; scale ``None`` = 1 / sqrt(D); window: see the module docstring.
    Deterministic: recomputing it gives the same selection.
    """
    batch, heads, kv_heads, q_len, kv_len = check_qkv(q, k)
    validate_mask(attn_mask, is_causal, batch, heads, q_len, kv_len)
    scale = resolve_scale(scale, q.shape[-1])
    with torch.no_grad():
        ahat = _estimate(q, k, attn_mask, is_causal, scale, config, window)
        allowed = allowed_blocks(
            attn_mask, is_causal, batch, heads, q_len, kv_len, config.block_size, q.device, window=window
        )
        return select_on_device(
            ahat, allowed, config, kv_heads, is_causal=is_causal, q_len=q_len, kv_len=kv_len
        )


@dataclass
class SparseResult:
    """What `omnisparse_attention` computed.

    Attributes:
        out: [B, H, Sq, Dv] in q.dtype.
        lse: float32 [B, H, Sq] (natural log) when the sparse path ran; zeros when dense ran.
        selection: the block selection.
        dense_reason: why dense attention ran instead ("" when sparse ran).
    """

    out: torch.Tensor
    lse: torch.Tensor
    selection: BlockSelection
    dense_reason: str


def _dense(q, k, v, attn_mask, is_causal, scale, window: int | None = None) -> torch.Tensor:
    return dense_attention(q, k, v, attn_mask, is_causal, scale, q.shape[1] != k.shape[1], window)


def omnisparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    config: OmniSparseConfig,
    window: int | None = None,
) -> SparseResult:
    """OmniSparse attention with SDPA semantics (shapes as `plan`; v: [B, Hkv, Skv, Dv]).

    On the CPU, differentiable by autograd with respect to q, k, v with the selection held constant
    (METHOD.md section 5); the op's registered backward is `omnisparse_attention_backward`.
    """
    check_qkv(q, k, v)
    selection = plan(q, k, attn_mask, is_causal, scale, config, window)
    reason = density_fallback_reason(selection, attn_mask, is_causal, config, window)
    if reason:
        out = _dense(q, k, v, attn_mask, is_causal, scale, window)
        return SparseResult(out, q.new_zeros(q.shape[:3], dtype=torch.float32), selection, reason)
    out, lse = _attend(
        q, k, v, selection, attn_mask, is_causal, resolve_scale(scale, q.shape[-1]), config, window
    )
    return SparseResult(out, lse, selection, "")


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
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `omnisparse_attention` for the cotangent grad_out [B, H, Sq, Dv].

    Recomputes the (deterministic) selection and the density decision, then differentiates exactly
    the attention that ran: the Triton backward on CUDA (it reuses ``out`` and ``lse``), else the
    reference through ``torch.func.vjp`` (usable inside a custom op, below the autograd keys).
    """
    selection = plan(q, k, attn_mask, is_causal, scale, config, window)
    if density_fallback_reason(selection, attn_mask, is_causal, config, window):
        _, vjp_fn = torch.func.vjp(
            lambda q_, k_, v_: _dense(q_, k_, v_, attn_mask, is_causal, scale, window), q, k, v
        )
        return vjp_fn(grad_out)
    scale = resolve_scale(scale, q.shape[-1])
    if q.device.type == "cuda" and triton_bwd.supported(q, k, v, attn_mask) is None:
        return triton_bwd.sparse_attention_bwd(
            grad_out, q, k, v, out, lse, selection, attn_mask, is_causal, scale, window=window
        )

    def attention_out(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
        return sparse_attention_reference(
            q_, k_, v_, selection, attn_mask, is_causal, scale, config.query_chunk, window=window
        )[0]

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
    window: int | None = None,
) -> dict[str, float]:
    """`metrics.SelectionStats` of the selection plus ``rel_error`` of ``out`` against dense SDPA.

    Costs an exact pass (chunked by ``config.query_chunk``) and a dense attention: for explain/benchmarks.
    A window is measured as its materialised mask.
    """
    mask, causal = with_window(q, k, attn_mask, is_causal, window)
    stats = measure_selection(q, k, mask, causal, scale, selection, config.query_chunk).as_dict()
    return {**stats, "rel_error": relative_error(out, _dense(q, k, v, attn_mask, is_causal, scale, window))}
