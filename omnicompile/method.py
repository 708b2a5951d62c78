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
``config.dense_fallback_density`` takes every allowed block (`selection.reference.full_dense_heads`)
and runs exact attention through the same sparse kernel, on every device alike. The fraction of such heads
is measured lazily, when a recorder asks (`selection_stats`: ``dense_heads``).

``window`` (TEAM.md "Sliding windows": only with ``is_causal=True`` and no mask) goes to every
estimator, mask, reference and kernel call as ``window=``; the logit soft-cap ``softcap`` (Gemma 2,
`kernels.softcap`) to every estimator, reference, kernel and dense call as ``softcap=``.

An op call's inputs are checked once: q, k, v and the window when its `AttentionInputs` is built, the
mask (on the sparse path) by `masks.allowed_blocks`; the pipeline calls the references with
``check=False``.
The kernels take the config as per-stage parameters (`estimation_params`, `selection_params`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch

from .config import OmniSparseConfig
from .dense import dense_attention, with_window
from .kernels.estimation import EstimationParams, estimate_blocks, triton_composite, triton_probe
from .kernels.masks import allowed_blocks, check_qkv, check_window, resolve_scale
from .kernels.selection import BlockSelection, SelectionCall, SelectionParams, select_blocks, triton_select
from .kernels.selection.transpose import selection_from_block_mask
from .kernels.softcap import check_softcap
from .kernels.sparse_attention import sparse_attention, triton_bwd, triton_fwd
from .metrics import exact_block_mass, relative_error
from .metrics import selection_stats as measure_selection

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_Params = TypeVar("_Params", EstimationParams, SelectionParams)


@dataclass(frozen=True)
class AttentionInputs:
    """One attention call, SDPA semantics; q, k, v, the window and the cap are checked when it is built
    (`masks.check_qkv`, `masks.check_window`, `softcap.check_softcap`: ``ValueError`` naming what is
    wrong), the mask by `plan` (`masks.allowed_blocks`) or by dense attention.

    Attributes:
        q: [B, H, Sq, D]; k: [B, Hkv, Skv, D]; v: [B, Hkv, Skv, Dv], or None where only the selection
            is wanted (`plan`); floating point, H a multiple of Hkv.
        attn_mask: None, bool (True = keep) or additive float, broadcastable to [B, H, Sq, Skv].
        is_causal: top-left causal; exclusive with attn_mask.
        scale: score scale, ``None`` = 1 / sqrt(D).
        window: causal sliding window (module docstring), or None.
        softcap: logit soft-cap (scores s -> softcap * tanh(s / softcap) before the mask), or None.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor | None
    attn_mask: torch.Tensor | None
    is_causal: bool
    scale: float | None
    window: int | None = None
    softcap: float | None = None

    def __post_init__(self) -> None:
        check_qkv(self.q, self.k, self.v)
        check_window(self.window, self.is_causal, self.attn_mask)
        check_softcap(self.softcap)


def _stage_params(cls: type[_Params], config: OmniSparseConfig, **values: object) -> _Params:
    """``cls`` with every field the config field of its name, unless given in ``values``."""
    return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)} | values)


def estimation_params(config: OmniSparseConfig) -> EstimationParams:
    """The estimation stage's parameters from the config."""
    return _stage_params(EstimationParams, config)


def selection_params(config: OmniSparseConfig) -> SelectionParams:
    """The selection stage's parameters from the config (the lazy threshold in force)."""
    return _stage_params(SelectionParams, config, lazy_threshold=config.effective_lazy_threshold)


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
    key length (a window site: its span ``min(window, Skv)``) against ``min_seq_len``, the head dim
    against ``max_head_dim``, a query shorter than a block (a decode step), the dtype, Dv != D, and
    on CUDA what the Triton prefill kernel rejects (the CPU references take every input the op accepts).
    """
    reason = ""
    if config.mode == "dense":
        reason = "mode='dense'"
    elif k.shape[2] < config.min_seq_len:
        reason = f"kv length {k.shape[2]} < min_seq_len {config.min_seq_len}"
    elif window is not None and window < config.min_seq_len:
        reason = f"window {window} < min_seq_len {config.min_seq_len}"
    elif q.shape[-1] > config.max_head_dim:
        reason = f"head dim {q.shape[-1]} > max_head_dim {config.max_head_dim}"
    elif q.shape[2] < config.block_size:
        reason = f"query length {q.shape[2]} < block_size {config.block_size} (decode step)"
    elif q.dtype not in _SUPPORTED_DTYPES:
        reason = f"dtype {q.dtype} not supported"
    elif v.shape[-1] != q.shape[-1]:
        reason = f"value head dim {v.shape[-1]} differs from query head dim {q.shape[-1]}"
    elif q.device.type == "cuda" and (unsupported := triton_fwd.supported(q, k, v, attn_mask)):
        reason = f"Triton prefill kernel: {unsupported}"
    return Decision("dense", reason) if reason else Decision("sparse")


def _decide(x: AttentionInputs, config: OmniSparseConfig) -> Decision:
    return decide(x.q, x.k, x.v, x.attn_mask, config, x.window)


def _on_triton(t: torch.Tensor, triton: bool | None) -> bool:
    """Whether a stage runs its Triton kernel where that takes the inputs: ``triton``, by default
    (None) on CUDA."""
    return t.is_cuda if triton is None else triton


def _estimate(x: AttentionInputs, params: EstimationParams, triton: bool | None = None) -> torch.Tensor:
    """Ahat float32 [B, H, nq, nk] (the one estimator call)."""
    q, k, mask, causal, scale = x.q, x.k, x.attn_mask, x.is_causal, resolve_scale(x.scale, x.q.shape[-1])
    options = {"window": x.window, "softcap": x.softcap}
    if _on_triton(q, triton) and triton_composite.supported(q, k, mask, params) is None:
        return triton_composite.estimate_blocks(q, k, mask, causal, scale, params, **options)
    return estimate_blocks(q, k, mask, causal, scale, params, **options, check=False)


def _attend(
    x: AttentionInputs, selection: BlockSelection, config: OmniSparseConfig, triton: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, Sq, Dv] in q.dtype, lse float32 [B, H, Sq]) over the selection (the one attention call)."""
    args = (x.q, x.k, x.v, selection, x.attn_mask, x.is_causal, resolve_scale(x.scale, x.q.shape[-1]))
    if _on_triton(x.q, triton):
        return triton_fwd.sparse_attention(*args, window=x.window, softcap=x.softcap)
    return sparse_attention(*args, config.query_chunk, window=x.window, softcap=x.softcap, check=False)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None,
    window: int,
    block_size: int,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Exact causal sliding-window attention (out [B, H, Sq, Dv] in q.dtype, lse float32 [B, H, Sq]),
    soft-capped at ``softcap`` if given: the Triton kernel over every block the band touches,
    O(Sq * window) work where SDPA with the materialised mask does O(Sq * Skv) and allocates the
    [Sq, Skv] mask. None where the kernel cannot take the inputs (`triton_fwd.supported`)."""
    if triton_fwd.supported(q, k, v, None) is not None:
        return None
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    band = allowed_blocks(None, True, batch, heads, q_len, kv_len, block_size, q.device, window=window)
    selection = selection_from_block_mask(band.expand(batch, heads, -1, -1), block_size, q_len, kv_len)
    scale = resolve_scale(scale, q.shape[-1])
    return triton_fwd.sparse_attention(q, k, v, selection, None, True, scale, window=window, softcap=softcap)


def select_on_device(
    ahat: torch.Tensor,
    allowed: torch.Tensor,
    params: SelectionParams,
    call: SelectionCall,
    triton: bool | None = None,
) -> BlockSelection:
    """The selection of `select_blocks` (the one selection call): the fused Triton kernel on CUDA
    (``triton``: as `_on_triton`)."""
    if _on_triton(ahat, triton) and triton_select.supported(ahat, allowed) is None:
        return triton_select.select_blocks(ahat, allowed, params, call)
    return select_blocks(ahat, allowed, params, call)


def plan(x: AttentionInputs, config: OmniSparseConfig, triton: bool | None = None) -> BlockSelection:
    """The block selection of METHOD.md sections 1-3 for the call ``x`` (no gradient flows through it);
    ``triton``: whether the estimator and the selection run their Triton kernels (None: on CUDA).

    Deterministic: recomputing it gives the same selection.
    """
    batch, heads, q_len, _ = x.q.shape
    with torch.no_grad():
        allowed = allowed_blocks(
            x.attn_mask,
            x.is_causal,
            batch,
            heads,
            q_len,
            x.k.shape[2],
            config.block_size,
            x.q.device,
            window=x.window,
        )
        ahat = _estimate(x, estimation_params(config), triton)
        call = SelectionCall(x.k.shape[1], x.is_causal, q_len, x.k.shape[2])
        return select_on_device(ahat, allowed, selection_params(config), call, triton)


@dataclass
class AttentionRun:
    """What one call of `omnisparse_attention` ran.

    Attributes:
        out: [B, H, Sq, Dv] in q.dtype.
        lse: float32 [B, H, Sq]: the natural-log log-sum-exp of the scaled (soft-capped) masked scores over
            the attended keys, -inf for a row that sees no key; on the dense path only when asked
            (``need_lse``), else zeros.
        decision: `decide`'s decision.
        selection: the block selection when the sparse path ran, else None.
    """

    out: torch.Tensor
    lse: torch.Tensor
    decision: Decision
    selection: BlockSelection | None


def _dense(
    x: AttentionInputs, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, need_lse: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`dense.dense_attention` (out, lse or None) of q, k, v (``x``'s tensors or their vjp primals) with
    ``x``'s mask, scale, window and cap."""
    gqa = q.shape[1] != k.shape[1]
    return dense_attention(q, k, v, x.attn_mask, x.is_causal, x.scale, gqa, x.window, x.softcap, need_lse)


def _vjp(fn: Callable[..., torch.Tensor], primals: tuple[torch.Tensor, ...], grad_out: torch.Tensor):
    """Gradients of ``fn(*primals)`` against ``grad_out`` by ``torch.func.vjp`` (plain autograd is
    unavailable inside a custom op's implementation: the dispatcher runs it below the autograd keys)."""
    _, vjp_fn = torch.func.vjp(fn, *primals)
    return vjp_fn(grad_out)


def omnisparse_attention(x: AttentionInputs, config: OmniSparseConfig, need_lse: bool = True) -> AttentionRun:
    """The op's forward, SDPA semantics: `decide`, then the sparse method (`plan`, then `_attend`) or
    dense attention.

    Dense attention is SDPA (`dense.dense_attention`; soft-capped: `dense.capped_attention`); a window
    site on CUDA runs exactly over the blocks its band touches with the Triton kernel
    (`window_attention`) where that takes the inputs. The sparse kernels, the band kernel and the
    capped path compute the lse anyway; SDPA does not, so there it costs `dense.dense_lse`'s pass over
    the scores, run only when ``need_lse`` (else the lse is zeros).
    On the CPU, differentiable by autograd with respect to q, k, v with the selection held constant
    (METHOD.md section 5); the op's registered backward is `omnisparse_attention_backward`.
    """
    decision = _decide(x, config)
    if decision.path == "sparse":
        selection = plan(x, config)
        out, lse = _attend(x, selection, config)
        return AttentionRun(out, lse, decision, selection)
    if x.window is not None and x.q.device.type == "cuda":
        band = window_attention(x.q, x.k, x.v, x.scale, x.window, config.block_size, x.softcap)
        if band is not None:
            return AttentionRun(*band, decision, None)
    return AttentionRun(*dense_outputs(x, need_lse), decision, None)


def dense_outputs(x: AttentionInputs, need_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of ``x`` (`dense.dense_attention`): out [B, H, Sq, Dv] in q.dtype and lse float32
    [B, H, Sq], zeros unless ``need_lse``."""
    out, lse = _dense(x, x.q, x.k, x.v, need_lse)
    return out, x.q.new_zeros(x.q.shape[:3], dtype=torch.float32) if lse is None else lse


def masked_sparse_outputs(
    x: AttentionInputs, config: OmniSparseConfig, need_lse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse method with its attention as dense attention under the selection's token mask: the
    reference `plan` (``triton=False``), then `dense.dense_attention` with the selected blocks (and
    ``x``'s mask and window) as a bool [B, H, Sq, Skv] mask. out [B, H, Sq, Dv] in q.dtype, lse float32
    [B, H, Sq] (zeros unless ``need_lse``): `_attend`'s reference to fp32 rounding.

    Every shape follows from the inputs' (the reference attention sizes its gather by the largest
    selected count, a data-dependent shape), so it traces into aten ops for a package without
    Python; the price is O(Sq * Skv) mask and scores where the reference gathers selected blocks.
    """
    selection = plan(x, config, triton=False)
    b, (q_len, kv_len) = config.block_size, (x.q.shape[2], x.k.shape[2])
    keep = selection.dense_mask().repeat_interleave(b, 2).repeat_interleave(b, 3)[..., :q_len, :kv_len]
    mask, causal = with_window(x.q, x.k, x.attn_mask, x.is_causal, x.window)
    if mask is not None:
        keep = keep & mask if mask.dtype == torch.bool else torch.where(keep, mask, float("-inf"))
    inputs = AttentionInputs(x.q, x.k, x.v, keep, causal, x.scale, None, x.softcap)
    return dense_outputs(inputs, need_lse)


def triton_reason(x: AttentionInputs, config: OmniSparseConfig) -> str | None:
    """None when every stage of the call ``x`` is a Triton kernel (`triton_attention`), else why not:
    it runs dense (`decide`), or the fused estimator, probe, selection or forward does not take it
    (a mask, for one). From shapes, dtypes, device and config only."""
    decision = _decide(x, config)
    if decision.path == "dense":
        return f"runs dense attention ({decision.reason})"
    params = estimation_params(config)
    batch, heads, q_len, _ = x.q.shape
    nq, nk = -(-q_len // config.block_size), -(-x.k.shape[2] // config.block_size)
    # Shaped like the selection's inputs without their memory (the checks read metadata only).
    ahat = x.q.new_empty((), dtype=torch.float32).expand(batch, heads, nq, nk)
    allowed = x.q.new_empty((), dtype=torch.bool).expand(1, 1, nq, nk)
    reasons = (
        triton_composite.supported(x.q, x.k, x.attn_mask, params),
        triton_probe.supported(x.q, x.k, x.attn_mask) if params.row_probe else None,
        triton_select.supported(ahat, allowed),
        triton_fwd.supported(x.q, x.k, x.v, x.attn_mask),
    )
    return next((reason for reason in reasons if reason is not None), None)


def triton_attention(x: AttentionInputs, config: OmniSparseConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the sparse method with the Triton kernels on any device (the interpreter's on the
    CPU): `plan` and `_attend` with ``triton=True``, what `omnisparse_attention` runs on CUDA for a call
    that `triton_reason` accepts."""
    return _attend(x, plan(x, config, triton=True), config, triton=True)


def omnisparse_attention_backward(
    grad_out: torch.Tensor, x: AttentionInputs, out: torch.Tensor, lse: torch.Tensor, config: OmniSparseConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `omnisparse_attention` for the cotangent grad_out [B, H, Sq, Dv], given its
    ``out`` and ``lse``.

    The same `decide`, then exactly the attention that ran: dense attention through `_vjp`, or the
    recomputed (deterministic) selection with the Triton backward on CUDA (it reuses ``out`` and
    ``lse``), else the reference through `_merged_vjp`. On the sparse path ``out`` and ``lse`` may be
    those of a merged attention over these keys and others (`merge.merge_attention`; context
    parallelism's ring): the result is then this call's share of that attention's gradients, on
    both devices (the flash-attention backward's contract). The dense path ignores them.
    """
    primals = (x.q, x.k, x.v)
    if _decide(x, config).path == "dense":
        return _vjp(lambda q_, k_, v_: _dense(x, q_, k_, v_)[0], primals, grad_out)
    selection = plan(x, config)
    scale = resolve_scale(x.scale, x.q.shape[-1])
    if x.q.device.type == "cuda" and triton_bwd.supported(*primals, x.attn_mask) is None:
        return triton_bwd.sparse_attention_backward(
            grad_out, *primals, out, lse, selection, x.attn_mask, x.is_causal, scale,
            window=x.window, softcap=x.softcap,
        )  # fmt: skip

    def attention(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor):
        return sparse_attention(
            q_, k_, v_, selection, x.attn_mask, x.is_causal, scale, config.query_chunk,
            window=x.window, softcap=x.softcap, check=False,
        )  # fmt: skip

    return _merged_vjp(attention, primals, grad_out, out, lse)


def _merged_vjp(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    primals: tuple[torch.Tensor, ...],
    grad_out: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
):
    """Gradients, against ``grad_out``, of the attention whose output is ``out`` and lse ``lse`` (float32
    [B, H, Sq]) through its part ``fn(*primals) -> (out_i, lse_i)`` over some of its keys.

    The merge (`merge.merge_attention`) weighs the part by w = exp(lse_i - lse), so its cotangents are
    w * grad_out for out_i and w * rowsum(grad_out * (out_i - out)) for lse_i. When ``out`` and ``lse``
    are the part's own, w = 1 and the second is 0: the plain vjp of out_i.
    """
    (part_out, part_lse), vjp_fn = torch.func.vjp(fn, *primals)
    weight = torch.where(torch.isneginf(part_lse), 0.0, torch.exp(part_lse - lse.float()))
    d_out = weight.unsqueeze(-1) * grad_out.float()
    d_lse = weight * (grad_out.float() * (part_out.float() - out.float())).sum(-1)
    return vjp_fn((d_out.to(part_out.dtype), d_lse))


def selection_stats(
    x: AttentionInputs, config: OmniSparseConfig, selection: BlockSelection, out: torch.Tensor
) -> dict[str, float]:
    """`metrics.SelectionStats` of the selection plus ``rel_error`` of ``out`` against dense SDPA.

    Costs an exact pass (chunked by ``config.query_chunk``) and a dense attention: for explain/benchmarks.
    A window is measured as its materialised mask.
    """
    q, k = x.q, x.k
    mask, causal = with_window(q, k, x.attn_mask, x.is_causal, x.window)
    mass = exact_block_mass(
        q, k, mask, causal, x.scale, selection.block_size, config.query_chunk, softcap=x.softcap
    )
    batch, heads, q_len, _ = q.shape
    allowed = allowed_blocks(mask, causal, batch, heads, q_len, k.shape[2], selection.block_size, q.device)
    stats = measure_selection(selection, mass, allowed).as_dict()
    return {**stats, "rel_error": relative_error(out, _dense(x, x.q, x.k, x.v)[0])}
