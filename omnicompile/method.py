"""The OmniSparse pipeline: estimate, select, attend (METHOD.md sections 1-3 and 5), and the one
decision per op call between it and dense attention (`decide`).

Device dispatch lives here, one place each: `_estimate` runs the fused Triton estimator on CUDA
when it takes the inputs (else the reference estimator), `plan` the fused Triton selection on CUDA
(else `select_blocks`), `_attend` the Triton block-sparse kernel on CUDA, and the backward the
Triton backward kernels on CUDA. On the CPU everything runs the pure-PyTorch references, which take
every input the op accepts.

`decide` reads only shapes, dtypes, the device and the config (what is known when tracing), never
tensor data: the op has no host synchronisation and can be captured in a CUDA graph. Where the
selection itself is nearly dense, the selection decides on the device: a (batch, head) denser than
``config.dense_fallback_density`` takes every allowed block (`select.full_dense_heads`) and runs
exact attention through the same sparse kernel, on every device alike. The fraction of such heads
is measured lazily, when a recorder asks (`selection_stats`: ``dense_heads``).

``window`` (TEAM.md "Sliding windows": only with ``is_causal=True`` and no mask) goes to every
estimator, mask, reference and kernel call as ``window=``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

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

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Decision:
    """How one op call runs: ``path`` ``"sparse"`` (the method) or ``"dense"``, and ``reason`` why dense
    ("" for sparse)."""

    path: Literal["sparse", "dense"]
    reason: str = ""


def decide(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    config: OmniSparseConfig,
    window: int | None = None,
) -> Decision:
    """Dense or sparse for q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv], and why.

    From shapes, dtypes, device and config only (no tensor data, no synchronisation): mode, the
    key length (a window site: its span ``min(window, Skv)``) against ``min_seq_len``, a query
    shorter than a block (a decode step), the dtype, Dv != D, and on CUDA what the Triton prefill
    kernel rejects (the CPU references take every input the op accepts).
    """
    reason = ""
    if config.mode == "dense":
        reason = "mode='dense'"
    elif k.shape[2] < config.min_seq_len:
        reason = f"kv length {k.shape[2]} < min_seq_len {config.min_seq_len}"
    elif window is not None and window < config.min_seq_len:
        reason = f"window {window} < min_seq_len {config.min_seq_len}"
    elif q.shape[2] < config.block_size:
        reason = f"query length {q.shape[2]} < block_size {config.block_size} (decode step)"
    elif q.dtype not in _SUPPORTED_DTYPES:
        reason = f"dtype {q.dtype} not supported"
    elif v.shape[-1] != q.shape[-1]:
        reason = f"value head dim {v.shape[-1]} differs from query head dim {q.shape[-1]}"
    elif q.device.type == "cuda" and (unsupported := triton_fwd.supported(q, k, v, attn_mask)):
        reason = f"Triton prefill kernel: {unsupported}"
    return Decision("dense", reason) if reason else Decision("sparse")


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
class AttentionRun:
    """What one call of `omnisparse_attention` ran.

    Attributes:
        out: [B, H, Sq, Dv] in q.dtype.
        lse: float32 [B, H, Sq] (natural log) when the sparse path ran; zeros when dense ran.
        decision: `decide`'s decision.
        selection: the block selection when the sparse path ran, else None.
    """

    out: torch.Tensor
    lse: torch.Tensor
    decision: Decision
    selection: BlockSelection | None


def _dense(q, k, v, attn_mask, is_causal, scale, window: int | None = None) -> torch.Tensor:
    return dense_attention(q, k, v, attn_mask, is_causal, scale, q.shape[1] != k.shape[1], window)


def _vjp(fn: Callable[..., torch.Tensor], primals: tuple[torch.Tensor, ...], grad_out: torch.Tensor):
    """Gradients of ``fn(*primals)`` against ``grad_out`` by ``torch.func.vjp`` (plain autograd is
    unavailable inside a custom op's implementation: the dispatcher runs it below the autograd keys)."""
    _, vjp_fn = torch.func.vjp(fn, *primals)
    return vjp_fn(grad_out)


def omnisparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    config: OmniSparseConfig,
    window: int | None = None,
) -> AttentionRun:
    """The op's forward, SDPA semantics (shapes as `plan`; v: [B, Hkv, Skv, Dv]): `decide`, then the
    sparse method (`plan`, then `_attend`) or dense attention.

    Dense attention is SDPA (`dense.dense_attention`); a window site on CUDA runs exactly over the
    blocks its band touches with the Triton kernel (`window_attention`) where that takes the inputs.
    On the CPU, differentiable by autograd with respect to q, k, v with the selection held constant
    (METHOD.md section 5); the op's registered backward is `omnisparse_attention_backward`.
    """
    check_qkv(q, k, v)
    decision = decide(q, k, v, attn_mask, config, window)
    if decision.path == "sparse":
        selection = plan(q, k, attn_mask, is_causal, scale, config, window)
        out, lse = _attend(
            q, k, v, selection, attn_mask, is_causal, resolve_scale(scale, q.shape[-1]), config, window
        )
        return AttentionRun(out, lse, decision, selection)
    out = None
    if window is not None and q.device.type == "cuda":
        out = window_attention(q, k, v, scale, window, config.block_size)
    if out is None:
        out = _dense(q, k, v, attn_mask, is_causal, scale, window)
    return AttentionRun(out, q.new_zeros(q.shape[:3], dtype=torch.float32), decision, None)


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

    The same `decide`, then exactly the attention that ran: dense attention through `_vjp`, or the
    recomputed (deterministic) selection with the Triton backward on CUDA (it reuses ``out`` and
    ``lse``), else the reference through `_vjp`.
    """
    if decide(q, k, v, attn_mask, config, window).path == "dense":
        return _vjp(
            lambda q_, k_, v_: _dense(q_, k_, v_, attn_mask, is_causal, scale, window), (q, k, v), grad_out
        )
    selection = plan(q, k, attn_mask, is_causal, scale, config, window)
    scale = resolve_scale(scale, q.shape[-1])
    if q.device.type == "cuda" and triton_bwd.supported(q, k, v, attn_mask) is None:
        return triton_bwd.sparse_attention_bwd(
            grad_out, q, k, v, out, lse, selection, attn_mask, is_causal, scale, window=window
        )

    def attention_out(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
        return sparse_attention_reference(
            q_, k_, v_, selection, attn_mask, is_causal, scale, config.query_chunk, window=window
        )[0]

    return _vjp(attention_out, (q, k, v), grad_out)


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
