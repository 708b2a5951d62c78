"""The custom op ``torch.ops.omnisparse.attention`` that the passes put in place of attention.

Schema (SDPA's arguments, plus the config, the site name, a sliding window, a mask check, a logit
soft-cap and whether the lse is read)::

    omnisparse::attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float dropout_p,
                          bool is_causal, float? scale, bool enable_gqa, str config, str site,
                          int? window=None, Tensor? mask_check=None, float? softcap=None,
                          bool need_lse=True) -> (Tensor out, Tensor lse)

q: [B, H, Sq, D]; k: [B, Hkv, Skv, D]; v: [B, Hkv, Skv, Dv]; attn_mask: None, bool (True = keep) or
additive float, broadcastable to [B, H, Sq, Skv]. ``out`` [B, H, Sq, Dv] (q.dtype; laid out as
[B, Sq, H, Dv], `out_like`) equals SDPA semantics when nothing is skipped; ``lse`` float32 [B, H, Sq] is
the natural-log log-sum-exp of the scaled (soft-capped) masked scores over the attended keys, on every
path, and -inf for a row that sees no key (additive values <= ``finfo.min / 2`` count as masked, as in
`kernels.masks`), so that partial attentions over disjoint keys merge exactly (`merge.merge_attention`).
It is not differentiable (the backward ignores it). ``need_lse=False`` (the passes' and the transformers
integration's calls, which never read it) lets dense attention skip computing it (SDPA returns none;
`dense.dense_lse`): the lse is then zeros where dense attention ran. ``window`` (only with
``is_causal=True`` and no mask): query row r sees keys ``r - window < c <= r``. ``mask_check``: the 0-d
bool that ``omnisparse::causal_mask_check`` computed for ``attn_mask`` (the passes insert one per
distinct mask per graph, where the mask is not known at compile time); when True the call runs as
``is_causal=True`` without the mask. The op never reads a mask to find out whether it is causal.
``softcap`` (Gemma 2's logit soft-capping; None or a finite number > 0, else ``ValueError``): the scaled
scores s = scale * q . k become ``softcap * tanh(s / softcap)`` before the mask is added and the softmax
taken, as transformers' eager Gemma 2 attention; ``lse`` is then that of the capped scores.

This module only registers the op (schema, fake, autograd, autocast), validates its arguments and
logs and records what ran. What runs is `method.omnisparse_attention`: `method.decide` chooses between
the sparse method and dense attention per call from shapes, dtypes, device and config (no tensor
data, so no host synchronisation); every dense decision is logged once per site and kind of reason
on the ``omnicompile`` logger. Heads whose selection is nearly dense are made dense inside the
selection, on the device (`method` module docstring); they are not logged (that would need a sync)
but measured by a recorder that asks (``dense_heads`` in the stats).
Autograd is registered: the backward is the opaque op ``omnisparse::attention_backward``
(`method.omnisparse_attention_backward`), which recomputes the (deterministic) selection and differentiates
exactly the attention that ran.
Autocast (CPU and CUDA) follows SDPA's policy: inside an autocast region the floating inputs (q, k,
v and a float mask) are cast to the autocast dtype, so the op sees what SDPA would have seen.

``torch.ops.omnisparse.sparse_attention`` (`sparse_attention`, a ``torch.library.triton_op``) is the
op's sparse path alone for calls whose every stage is a Triton kernel (no mask, no dense decision):
export puts it in place of the op where that is known at export time (`passes.inline_attention`),
and AOTInductor compiles its kernels into the package, so the package runs without Python.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import Tensor

from .config import OmniSparseConfig
from .dense import with_window
from .kernels.masks import causal_if_equivalent, check_window
from .method import (
    AttentionInputs,
    AttentionRun,
    omnisparse_attention,
    omnisparse_attention_backward,
    selection_stats,
    triton_attention,
    triton_reason,
)
from .recording import SiteRun, active_recorders

logger = logging.getLogger("omnicompile")

_LOGGED: set[tuple[str, str]] = set()


def check_inputs(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float, enable_gqa: bool
) -> None:
    """Raise ``ValueError`` for inputs that no attention (dense or sparse) can take."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"omnisparse.attention: {name} must be 4-D [B, heads, seq, head_dim], got {tuple(t.shape)}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"omnisparse.attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"omnisparse.attention: q and k head dims differ ({q.shape[-1]} vs {k.shape[-1]})")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"omnisparse.attention: k {tuple(k.shape)} and v {tuple(v.shape)} disagree")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"omnisparse.attention: batch sizes differ ({q.shape[0]} vs {k.shape[0]})")
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads != kv_heads and not (enable_gqa and heads % kv_heads == 0):
        raise ValueError(
            f"omnisparse.attention: {heads} query heads and {kv_heads} KV heads need enable_gqa=True "
            "and a whole number of query heads per KV head"
        )
    if dropout_p != 0.0:
        raise ValueError(
            "omnisparse.attention: dropout_p must be 0 (the passes leave attention with dropout untouched)"
        )
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise ValueError(f"omnisparse.attention: attn_mask must be bool or float, got {attn_mask.dtype}")
        if attn_mask.requires_grad:
            raise ValueError("omnisparse.attention: a learnable attn_mask (requires_grad) is not supported")
        try:
            torch.broadcast_shapes(attn_mask.shape, (q.shape[0], heads, q.shape[2], k.shape[2]))
        except RuntimeError:
            raise ValueError(
                f"omnisparse.attention: attn_mask {tuple(attn_mask.shape)} does not broadcast to "
                f"[B, H, Sq, Skv] = {(q.shape[0], heads, q.shape[2], k.shape[2])}"
            ) from None


def resolve_mask(
    attn_mask: Tensor | None, is_causal: bool, mask_check: Tensor | None
) -> tuple[Tensor | None, bool]:
    """``(None, True)`` when ``mask_check`` (0-d bool, on the CPU: reading it costs no sync) says the
    mask is exactly causal; else ``(attn_mask, is_causal)``."""
    if mask_check is not None and attn_mask is not None and bool(mask_check):
        return None, True
    return attn_mask, is_causal


def effective_window(window: int | None, q_len: int) -> int | None:
    """``window``, or None when it cuts nothing.

    That is ``window >= q_len``: row r's keys c <= r all lie within it.
    """
    return None if window is None or window >= q_len else window


@torch.library.custom_op("omnisparse::causal_mask_check", mutates_args=())
def causal_mask_check(mask: Tensor) -> Tensor:
    """0-d bool on the CPU: whether ``mask`` ([..., S, S], bool or additive) is exactly causal at every
    batch and head (`causal_if_equivalent`: ``finfo.min`` and ``-inf`` count as masked).

    Reads the mask once and synchronises once; the passes insert one per distinct mask per graph,
    and the op calls sharing that mask read the result on the host without a sync.
    """
    square = mask.dim() >= 2 and mask.shape[-1] == mask.shape[-2]
    causal = square and causal_if_equivalent(mask, False, mask.shape[-2], mask.shape[-1])[1]
    return torch.tensor(causal)


@causal_mask_check.register_fake
def _causal_mask_check_fake(mask):
    return mask.new_empty((), dtype=torch.bool, device="cpu")


def _log_dense_once(site: str, reason: str) -> None:
    """Log a dense decision once per site and kind of reason (the reason without its numbers, so that
    a density or length that changes from call to call neither repeats the log nor grows `_LOGGED`)."""
    kind = (site, re.sub(r"\d+(\.\d+)?", "#", reason))
    if kind not in _LOGGED:
        _LOGGED.add(kind)
        logger.info("omnisparse site %s runs dense attention: %s", site, reason)


def _record(site: str, run: AttentionRun, x: AttentionInputs, cfg: OmniSparseConfig) -> None:
    """Append a `SiteRun` to the active recorders (none in normal runs: nothing is measured or copied).

    A recorder that measures gets the sparse run's `method.selection_stats` (synchronising: the user
    asked). A kept run holds copies of q, k and the mask (a window materialised as its mask), the
    causality, scale and soft-cap: a compiled graph reuses the op's input buffers.
    """
    recorders = active_recorders()
    if not recorders:
        return
    stats = {}
    if run.selection is not None and any(r.measure for r in recorders):
        stats = selection_stats(x, cfg, run.selection, run.out)
    shapes = (tuple(x.q.shape), tuple(x.k.shape), tuple(x.v.shape))
    for recorder in recorders:
        kept = None
        if recorder.keep_run == len(recorder.runs):
            mask, causal = with_window(x.q, x.k, x.attn_mask, x.is_causal, x.window)
            mask = None if mask is None else mask.clone()
            kept = (x.q.clone(), x.k.clone(), mask, causal, x.scale, x.softcap)
        recorder.runs.append(SiteRun(site, run.decision.path, run.decision.reason, shapes, stats, kept))


@torch.library.custom_op("omnisparse::attention", mutates_args=())
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    config: str,
    site: str,
    window: int | None = None,
    mask_check: Tensor | None = None,
    softcap: float | None = None,
    need_lse: bool = True,
) -> tuple[Tensor, Tensor]:
    """OmniSparse attention with SDPA semantics; see the module docstring."""
    check_inputs(q, k, v, attn_mask, dropout_p, enable_gqa)
    check_window(window, is_causal, attn_mask)
    cfg = OmniSparseConfig.from_json(config)
    attn_mask, is_causal = resolve_mask(attn_mask, is_causal, mask_check)
    window = effective_window(window, q.shape[2])
    x = AttentionInputs(q, k, v, attn_mask, is_causal, scale, window, softcap)
    run = omnisparse_attention(x, cfg, need_lse)
    if run.decision.path == "dense":
        _log_dense_once(site, run.decision.reason)
    _record(site, run, x, cfg)
    return in_out_layout(run.out, q), run.lse.contiguous()


@attention.register_fake
def _attention_fake(q, k, v, *_args, **_kwargs):
    return out_like(q, v.shape[-1]), q.new_empty(q.shape[:3], dtype=torch.float32)


def out_like(q: Tensor, dv: int) -> Tensor:
    """The op's empty output [B, H, Sq, Dv] in q.dtype, laid out as [B, Sq, H, Dv] in memory (as SDPA's
    flash and cuDNN outputs are): a model's transpose of it back to [B, Sq, H, Dv] is then a view, not a
    copy. The layout does not follow q's strides: Inductor may pass q at other strides than the fake
    saw, and the fake and real outputs must agree."""
    batch, heads, q_len, _ = q.shape
    return q.new_empty((batch, q_len, heads, dv)).transpose(1, 2)


def in_out_layout(out: Tensor, q: Tensor) -> Tensor:
    """``out`` [B, H, Sq, Dv] with `out_like`'s strides: ``out`` itself where they already agree (the
    sparse kernels' and SDPA's outputs on CUDA), else copied into a new `out_like` tensor."""
    batch, heads, q_len, dv = out.shape
    if out.stride() == (q_len * heads * dv, dv, heads * dv, 1):
        return out
    return out_like(q, dv).copy_(out)


@torch.library.triton_op("omnisparse::sparse_attention", mutates_args=())
def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    is_causal: bool,
    scale: float | None,
    config: str,
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The sparse method with every stage a Triton kernel (`method.triton_attention`): (out [B, H, Sq, D]
    in q.dtype, laid out as [B, Sq, H, D] as the Triton forward writes it, lse float32 [B, H, Sq]), as
    `attention` without a mask for the same arguments where `method.triton_reason` accepts the call,
    else ``ValueError`` with its reason.

    q: [B, H, Sq, D]; k, v: [B, Hkv, Skv, D] (GQA when Hkv < H); ``window``: a causal sliding window
    that cuts something (`effective_window`). Its kernels launch through `kernels.triton_utils.run_kernel`
    (``wrap_triton`` when traced); its fake implementation is its body on fake tensors. Inference only
    (no autograd registered).
    """
    cfg = OmniSparseConfig.from_json(config)
    x = AttentionInputs(q, k, v, None, is_causal, scale, window, softcap)
    reason = triton_reason(x, cfg)
    if reason is not None:
        raise ValueError(f"omnisparse.sparse_attention: {reason}")
    out, lse = triton_attention(x, cfg)
    return out, lse.contiguous()


@torch.library.custom_op("omnisparse::attention_backward", mutates_args=())
def attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    out: Tensor,
    lse: Tensor,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    config: str,
    window: int | None = None,
    mask_check: Tensor | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of `attention` with respect to q, k, v (shaped like them)."""
    cfg = OmniSparseConfig.from_json(config)
    attn_mask, is_causal = resolve_mask(attn_mask, is_causal, mask_check)
    x = AttentionInputs(q, k, v, attn_mask, is_causal, scale, effective_window(window, q.shape[2]), softcap)
    grads = omnisparse_attention_backward(grad_out, x, out, lse, cfg)
    return tuple(g.contiguous() for g in grads)


@attention_backward.register_fake
def _attention_backward_fake(grad_out, q, k, v, *_args, **_kwargs):
    # Contiguous, as the real implementation returns them (whatever the strides of q, k, v).
    return tuple(t.new_empty(t.shape) for t in (q, k, v))


def _setup_context(ctx, inputs, output) -> None:
    (
        q,
        k,
        v,
        attn_mask,
        _dropout,
        is_causal,
        scale,
        enable_gqa,
        config,
        _site,
        window,
        mask_check,
        softcap,
        _,
    ) = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, attn_mask, out, lse, mask_check)
    ctx.args = (is_causal, scale, enable_gqa, config, window, softcap)


def _backward(ctx, grad_out: Tensor, _grad_lse: Tensor):
    q, k, v, attn_mask, out, lse, mask_check = ctx.saved_tensors
    is_causal, scale, enable_gqa, config, window, softcap = ctx.args
    dq, dk, dv = attention_backward(
        grad_out.contiguous(),
        q,
        k,
        v,
        attn_mask,
        out,
        lse,
        is_causal,
        scale,
        enable_gqa,
        config,
        window,
        mask_check,
        softcap,
    )
    return dq, dk, dv, *(None,) * 11


attention.register_autograd(_backward, setup_context=_setup_context)


_AUTOCAST_DEVICES = ("cpu", "cuda")
_LIB = torch.library.Library("omnisparse", "FRAGMENT")


def autocast_inputs(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """``tensors`` as SDPA receives them under autocast: floating ones cast to the autocast dtype of
    their device when autocast is enabled there (SDPA's lower-precision policy), others unchanged."""

    def cast(t: Tensor | None) -> Tensor | None:
        if t is None or not t.is_floating_point() or t.device.type not in _AUTOCAST_DEVICES:
            return t
        if not torch.is_autocast_enabled(t.device.type):
            return t
        return t.to(torch.get_autocast_dtype(t.device.type))

    return tuple(cast(t) for t in tensors)


def _register_autocast(device_type: str) -> None:
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(q, k, v, attn_mask, *args, **kwargs):
        q, k, v, attn_mask = autocast_inputs(q, k, v, attn_mask)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return attention(q, k, v, attn_mask, *args, **kwargs)

    _LIB.impl("attention", kernel, key)


for _device_type in _AUTOCAST_DEVICES:
    _register_autocast(_device_type)
