"""Attention-mask handling and input checks shared by every estimator, selector, reference and kernel.

Semantics follow ``torch.nn.functional.scaled_dot_product_attention``:
- ``is_causal``: query row r sees key c iff c <= r (top-left aligned, also when Sq != Skv);
- a bool mask keeps the entries where it is True;
- a float mask is added to the scaled scores; entries <= ``finfo(dtype).min / 2`` (``-inf``, or the
  ``finfo.min`` that transformers' sliding-window and padding masks use) count as masked, like -inf;
- ``window`` (keyword, with ``is_causal=True`` and no mask only): query row r sees key c iff
  ``r - window < c <= r`` (transformers' sliding window; window >= Skv is plain causal).
A mask must broadcast to [B, H, Sq, Skv]; ``is_causal`` together with a mask is an error (as SDPA).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

MaskKind = Literal["none", "causal", "bool", "additive"]


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None
) -> tuple[int, int, int, int, int]:
    """Validate attention inputs and return (B, H, Hkv, Sq, Skv).

    q: [B, H, Sq, D]; k: [B, Hkv, Skv, D]; v: [B, Hkv, Skv, Dv]; floating point, non-empty, H a
    multiple of Hkv (GQA: query head h reads kv head h // (H // Hkv)). Raises ``ValueError`` naming
    the offending shape or dtype.
    """
    tensors = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    for name, t in tensors.items():
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, heads, seq, head_dim], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    batch, heads, q_len, dim = q.shape
    _, kv_heads, kv_len, _ = k.shape
    if k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(
            f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in batch/head_dim"
        )
    if v is not None and (v.shape[:3] != k.shape[:3]):
        raise ValueError(
            f"v shape {tuple(v.shape)} does not match k shape {tuple(k.shape)} in batch/heads/seq"
        )
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"query heads {heads} are not a multiple of kv heads {kv_heads}")
    if min(batch, q_len, kv_len, dim) == 0:
        raise ValueError(f"empty attention input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    return batch, heads, kv_heads, q_len, kv_len


def check_window(window: int | None, is_causal: bool, attn_mask: torch.Tensor | None) -> None:
    """Raise ``ValueError`` unless ``window`` is None or an int >= 1 with ``is_causal`` and no mask."""
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1 or None, got {window!r}")
    if not is_causal or attn_mask is not None:
        raise ValueError("window needs is_causal=True and attn_mask=None (a causal sliding window)")


def masked_floor(dtype: torch.dtype) -> float:
    """Additive-mask values at or below this (``finfo(dtype).min / 2``) count as masked, like -inf:
    their softmax weight underflows to exactly 0."""
    return torch.finfo(dtype).min / 2


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """The score scale: ``scale``, or SDPA's default 1 / sqrt(head_dim) when ``None``."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def classify_mask(attn_mask: torch.Tensor | None, is_causal: bool) -> MaskKind:
    """The kind of masking: ``"none"``, ``"causal"``, ``"bool"`` or ``"additive"`` (float mask)."""
    if attn_mask is None:
        return "causal" if is_causal else "none"
    if is_causal:
        raise ValueError("attn_mask and is_causal=True are mutually exclusive (as in SDPA)")
    if attn_mask.dtype == torch.bool:
        return "bool"
    if attn_mask.is_floating_point():
        return "additive"
    raise ValueError(
        f"attn_mask must be bool (True = keep) or floating point (additive), got {attn_mask.dtype}"
    )


def validate_mask(
    attn_mask: torch.Tensor | None, is_causal: bool, batch: int, heads: int, q_len: int, kv_len: int
) -> MaskKind:
    """Classify ``attn_mask`` and check it broadcasts to [batch, heads, q_len, kv_len]."""
    kind = classify_mask(attn_mask, is_causal)
    if attn_mask is not None:
        target = (batch, heads, q_len, kv_len)
        shape = tuple(attn_mask.shape)
        if attn_mask.dim() > 4 or any(s not in (1, t) for s, t in zip(shape[::-1], target[::-1])):
            raise ValueError(
                f"attn_mask shape {shape} is not broadcastable to [B, H, Sq, Skv] = {list(target)}"
            )
    return kind


_CAUSAL_CHECK_ELEMENTS = 1 << 26  # mask entries compared per step of `causal_if_equivalent`


def causal_if_equivalent(
    attn_mask: torch.Tensor | None, is_causal: bool, q_len: int, kv_len: int
) -> tuple[torch.Tensor | None, bool]:
    """``(None, True)`` when ``attn_mask`` equals ``is_causal`` masking at every batch and head, else
    ``(attn_mask, is_causal)`` unchanged.

    Equal means: bool, True exactly on the causal entries; or additive float, 0 on the causal
    entries and at most half the dtype's lowest value elsewhere (``-inf`` or transformers'
    ``finfo.min``: their softmax weight underflows to exactly 0). transformers materialises such a
    mask under torch.compile (bool for SDPA, float for eager attention); as ``is_causal`` the same
    attention takes the kernels' causal paths instead of reading the mask. Costs one read of the
    mask (in steps of ``_CAUSAL_CHECK_ELEMENTS`` entries) and one host sync.
    """
    if attn_mask is None or is_causal or q_len != kv_len:
        return attn_mask, is_causal
    if attn_mask.dim() < 2 or tuple(attn_mask.shape[-2:]) != (q_len, kv_len):
        return attn_mask, is_causal
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        return attn_mask, is_causal
    cols = torch.arange(kv_len, device=attn_mask.device)
    rows_per_step = max(1, _CAUSAL_CHECK_ELEMENTS // max(1, kv_len * attn_mask[..., 0, 0].numel()))
    masked_below = None if attn_mask.dtype == torch.bool else masked_floor(attn_mask.dtype)
    equal = torch.ones((), dtype=torch.bool, device=attn_mask.device)
    for start in range(0, q_len, rows_per_step):
        rows = torch.arange(start, min(q_len, start + rows_per_step), device=attn_mask.device)
        block = attn_mask[..., start : start + rows.numel(), :]
        causal = cols <= rows[:, None]
        if masked_below is None:
            equal &= (block == causal).all()
        else:  # kept entries exactly 0, the others low enough that their softmax weight is exactly 0
            equal &= torch.where(causal, block == 0, block <= masked_below).all()
    return (None, True) if bool(equal) else (attn_mask, is_causal)


def window_mask(q_len: int, kv_len: int, window: int, device: torch.device | str) -> torch.Tensor:
    """bool [q_len, kv_len]: causal sliding-window attention as a mask (True = keep).

    Query row r sees key c iff ``r - window < c <= r`` (transformers' ``sliding_window``: causal,
    and ``kv_idx > q_idx - sliding_window``). The materialised form of ``is_causal=True`` with
    ``window``, for the pure-PyTorch paths; kernels take ``window`` directly.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    rows = torch.arange(q_len, device=device)[:, None]
    cols = torch.arange(kv_len, device=device)[None, :]
    return (cols <= rows) & (cols > rows - window)


def _as_4d(attn_mask: torch.Tensor) -> torch.Tensor:
    """View of a (validated) mask with singleton dims prepended to 4-D."""
    return attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))


def mask_bias(
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    q_len: int,
    kv_len: int,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    window: int | None = None,
) -> torch.Tensor:
    """fp32 additive bias of the (query, key) position pairs ``q_pos`` x ``k_pos``.

    q_pos, k_pos: int64 tensors of equal rank n >= 2 broadcastable to each other; their first two
    dims index batch and head (size 1 or the mask's size there). Entries are 0 (keep), the additive
    mask value, or -inf (masked by the mask (values <= `masked_floor` included), causality or the
    window, or a position outside [0, q_len) x [0, kv_len): padding of partial blocks). Shape: the
    broadcast of q_pos, k_pos and the mask's batch/head dims (a mask of size B or H there widens
    dims 0 and 1).
    """
    check_window(window, is_causal, attn_mask)
    keep = (q_pos < q_len) & (k_pos < kv_len) & (q_pos >= 0) & (k_pos >= 0)
    if is_causal:
        keep = keep & (k_pos <= q_pos)
    if window is not None:
        keep = keep & (k_pos > q_pos - window)
    if attn_mask is None:
        return torch.zeros(keep.shape, dtype=torch.float32, device=keep.device).masked_fill_(
            ~keep, float("-inf")
        )
    mask = _as_4d(attn_mask)
    n = q_pos.dim()
    index = [
        torch.arange(mask.shape[0], device=mask.device).view((-1,) + (1,) * (n - 1)),
        torch.arange(mask.shape[1], device=mask.device).view((1, -1) + (1,) * (n - 2)),
        q_pos.clamp(0, q_len - 1) if mask.shape[2] > 1 else torch.zeros_like(q_pos),
        k_pos.clamp(0, kv_len - 1) if mask.shape[3] > 1 else torch.zeros_like(k_pos),
    ]
    values = mask[tuple(index)]
    if values.dtype == torch.bool:
        keep = keep & values
        values = torch.zeros((), dtype=torch.float32, device=values.device)
    else:
        keep = keep & (values > masked_floor(values.dtype))
    return torch.where(keep, values.float(), float("-inf"))


def allowed_blocks(
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    block_size: int,
    device: torch.device | str,
    *,
    window: int | None = None,
) -> torch.Tensor:
    """bool [B or 1, H or 1, nq, nk]: True where the (query block, key block) tile has an unmasked entry.

    nq = ceil(q_len / block_size), nk = ceil(kv_len / block_size). Dims 0 and 1 are 1 unless the mask
    varies over batch or heads there. Causal: key block j is allowed for query block i iff its first
    key j*b is <= the last query row of block i; with ``window`` also its last key must be
    > i*b - window (some row of block i sees it), so blocks wholly below the band are not allowed.
    An additive tile whose entries are all <= `masked_floor` (-inf or finfo.min) is not allowed.
    """
    kind = validate_mask(attn_mask, is_causal, batch, heads, q_len, kv_len)
    check_window(window, is_causal, attn_mask)
    nq, nk = -(-q_len // block_size), -(-kv_len // block_size)
    if kind == "none":
        return torch.ones(1, 1, nq, nk, dtype=torch.bool, device=device)
    if kind == "causal" and window is None:  # j * b <= min((i + 1) * b, q_len) - 1 is j <= i
        return torch.ones(nq, nk, dtype=torch.bool, device=device).tril_().view(1, 1, nq, nk)
    if kind == "causal":
        first_row = torch.arange(nq, device=device) * block_size
        last_row = (first_row + block_size).clamp(max=q_len) - 1
        first_key = torch.arange(nk, device=device) * block_size
        allowed = first_key[None, :] <= last_row[:, None]
        if window is not None:
            last_key = (first_key + block_size).clamp(max=kv_len) - 1
            allowed = allowed & (last_key[None, :] > first_row[:, None] - window)
        return allowed.view(1, 1, nq, nk)
    mask = _as_4d(attn_mask).to(device)
    keep = mask if kind == "bool" else mask > masked_floor(mask.dtype)
    rows = nq if keep.shape[2] > 1 else 1
    cols = nk if keep.shape[3] > 1 else 1
    pad_q = rows * block_size - keep.shape[2] if rows > 1 else 0
    pad_k = cols * block_size - keep.shape[3] if cols > 1 else 0
    keep = torch.nn.functional.pad(keep, (0, pad_k, 0, pad_q), value=False)
    tiles = keep.reshape(keep.shape[0], keep.shape[1], rows, -1, cols, keep.shape[3] // cols)
    return tiles.any(dim=5).any(dim=3).expand(keep.shape[0], keep.shape[1], nq, nk)
