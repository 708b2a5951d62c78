"""Split-K (flash-decoding) Triton kernel for decode attention over a slim (ragged) KV cache.

Same signature and semantics as `reference.slim_decode`. Grid of the first kernel: (B * Hkv, splits,
query-row tiles). One program owns one KV head and loads each of its kept keys/values once for all the
G * n query rows of its group (the G query heads times the n new tokens), over one split of the head's
virtual sequence ``kept prompt tokens ++ tail``; it reads only the kept rows of the packed buffer
(``offsets[b, h] .. + lengths[b, h]``), so a short head finishes early and its extra splits are empty.
Each split writes a partial output and its log-sum-exp (fp32); the second kernel merges the splits.
The tail length T is loaded from ``kv.tail_length`` on the device and the splits cover
``max_length + C`` keys (C the tail slots), so a launch reads nothing on the host and keeps its
geometry while T grows in a static tail (a CUDA graph replays it); splits past T are empty.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .slim_kv import SlimKV, check_decode_inputs

try:
    import triton
    import triton.language as tl

    from ..triton_utils import (
        LOG2E,
        LOG2E_JIT,
        MAX_HEAD_DIM,
        as_fp32,
        head_dim_pad,
        interpreting,
        needs_fp32_dot,
        softmax_finish,
        softmax_step,
        tile_dot,
    )
    from .launch import key_tile, row_tile
except ImportError:  # pragma: no cover - triton is absent on some CPU hosts
    triton = None

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK_N = 64  # split lengths are multiples of it (so of every `key_tile`)


def supported(q: Tensor, kv: SlimKV, scale: float | None = None) -> str | None:
    """None when `slim_decode` can run these inputs, else the reason it cannot."""
    if triton is None:
        return "triton is not installed"
    tensors = (q, *kv.tensors())
    if len({t.device for t in tensors}) != 1:
        return "tensors are on different devices"
    if not (q.is_cuda or (interpreting() and q.device.type == "cpu")):
        return f"device {q.device} (CUDA, or CPU with TRITON_INTERPRET=1)"
    if q.dtype not in _DTYPES or any(t.dtype != q.dtype for t in tensors[1:3] + tensors[5:7]):
        return (
            f"dtypes {sorted({str(t.dtype) for t in tensors})}: q and the cache must share one of {_DTYPES}"
        )
    if any(t.dtype != torch.int32 or not t.is_contiguous() for t in (kv.offsets, kv.lengths)):
        return "offsets/lengths must be contiguous int32"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    return None


if triton is not None:

    @triton.jit
    def _attend_tile(q, k, v, visible, m_i, l_i, acc, qk_scale, FP32_DOT: tl.constexpr):
        """Fold one key tile into the running base-2 (max, sum, weighted values) of each query row
        (`softmax_step`); ``visible`` [rows, keys] masks the scores."""
        scores = tl.where(visible, tile_dot(q, tl.trans(k), None, FP32_DOT) * qk_scale, float("-inf"))
        m_i, p, alpha = softmax_step(m_i, scores, 1.0, True)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tile_dot(p.to(v.dtype), v, None, FP32_DOT)
        return m_i, l_i, acc

    @triton.jit
    def split_kernel(
        Q,
        KP,
        VP,
        OFFSETS,
        LENGTHS,
        KT,
        VT,
        TAIL_LENGTH,
        MID_O,
        MID_LSE,
        qk_scale,
        n_q,
        group,
        num_kv_heads,
        split_len,
        num_splits,
        rows_padded,
        sq_b,
        sq_h,
        sq_n,
        sq_d,
        skp_n,
        skp_d,
        svp_n,
        svp_d,
        skt_b,
        skt_h,
        skt_t,
        skt_d,
        svt_b,
        svt_h,
        svt_t,
        svt_d,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        FP32_DOT: tl.constexpr,
    ):
        qk_scale = as_fp32(qk_scale)
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // num_kv_heads
        h = bh % num_kv_heads
        seg_start = tl.load(OFFSETS + bh).to(tl.int64)
        seg_len = tl.load(LENGTHS + bh)
        tail_len = tl.load(TAIL_LENGTH)
        start = split * split_len
        end = tl.minimum(start + split_len, seg_len + tail_len)

        rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # row = g * n + j
        row_ok = rows < group * n_q
        j = rows % n_q
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q_ptrs = (
            Q + b * sq_b + (h * group + rows // n_q)[:, None] * sq_h + j[:, None] * sq_n + d[None, :] * sq_d
        )
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        # Kept prompt tokens of this head in [start, end): all visible.
        for pos in range(start, tl.minimum(end, seg_len), BLOCK_N):
            p = pos + tl.arange(0, BLOCK_N)
            ok = p < tl.minimum(end, seg_len)
            rows_kv = (seg_start + p)[:, None]
            k = tl.load(
                KP + rows_kv * skp_n + d[None, :] * skp_d, mask=ok[:, None] & d_ok[None, :], other=0.0
            )
            v = tl.load(
                VP + rows_kv * svp_n + d[None, :] * svp_d, mask=ok[:, None] & d_ok[None, :], other=0.0
            )
            m_i, l_i, acc = _attend_tile(q, k, v, ok[None, :], m_i, l_i, acc, qk_scale, FP32_DOT)
        # Tail tokens in [start, end): query j sees tail index t <= tail_len - n_q + j.
        for pos in range(tl.maximum(start, seg_len), end, BLOCK_N):
            t = pos - seg_len + tl.arange(0, BLOCK_N)
            ok = t < end - seg_len
            k = tl.load(
                KT + b * skt_b + h * skt_h + t[:, None] * skt_t + d[None, :] * skt_d,
                mask=ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            v = tl.load(
                VT + b * svt_b + h * svt_h + t[:, None] * svt_t + d[None, :] * svt_d,
                mask=ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            visible = ok[None, :] & (t[None, :] <= (tail_len - n_q + j)[:, None])
            m_i, l_i, acc = _attend_tile(q, k, v, visible, m_i, l_i, acc, qk_scale, FP32_DOT)

        out, lse = softmax_finish(acc, m_i, l_i)
        mid = (bh * num_splits + split) * rows_padded + rows
        tl.store(MID_LSE + mid, lse)
        tl.store(MID_O + mid[:, None] * HEAD_DIM + d[None, :], out, mask=d_ok[None, :])

    @triton.jit
    def _combine_kernel(
        MID_O,
        MID_LSE,
        OUT,
        LSE,
        n_q,
        group,
        num_kv_heads,
        num_splits,
        rows_padded,
        so_b,
        so_h,
        so_n,
        so_d,
        sl_b,
        sl_h,
        sl_n,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        bh = tl.program_id(0)
        b = bh // num_kv_heads
        h = bh % num_kv_heads
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < group * n_q
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        # Merge the splits' (lse, out) states: an online softmax whose scores are the splits' lse.
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        denom = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for split in range(num_splits):
            mid = (bh * num_splits + split) * rows_padded + rows
            lse_s = tl.load(MID_LSE + mid)
            out_s = tl.load(MID_O + mid[:, None] * HEAD_DIM + d[None, :], mask=d_ok[None, :], other=0.0)
            m, w, alpha = softmax_step(m, (lse_s * LOG2E_JIT)[:, None], 1.0, True)
            denom = denom * alpha + tl.sum(w, 1)
            acc = acc * alpha[:, None] + w * out_s
        out, lse = softmax_finish(acc, m, denom)
        head = h * group + rows // n_q
        j = rows % n_q
        out_ptrs = OUT + b * so_b + head[:, None] * so_h + j[:, None] * so_n + d[None, :] * so_d
        tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE + b * sl_b + head * sl_h + j * sl_n, lse, mask=row_ok)


@functools.cache
def _target_programs(device: torch.device) -> int:
    """Programs worth launching: twice the SM count on CUDA, a handful in the CPU interpreter."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _split_len(kv: SlimKV, programs_per_split: int, device: torch.device) -> int:
    """Keys per split: enough splits to fill the device, each a whole number of key tiles."""
    longest = kv.max_length + kv.capacity
    splits = max(
        1, min(math.ceil(_target_programs(device) / programs_per_split), math.ceil(longest / _BLOCK_N))
    )
    return _BLOCK_N * math.ceil(longest / (splits * _BLOCK_N))


def slim_decode(q: Tensor, kv: SlimKV, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Decode attention of a few queries against a slim cache (see `reference.slim_decode`).

    Args:
        q: [B, H, n, D] fp16/bf16 (fp32 too), the n newest tokens' queries.
        kv: the layer's `SlimKV`, same dtype and device as q.
        scale: score scale, default 1/sqrt(D).

    Returns:
        out [B, H, n, D] in q's dtype and lse float32 [B, H, n].
    """
    check_decode_inputs(q, kv)
    reason = supported(q, kv, scale)
    if reason is not None:
        raise ValueError(f"triton slim_decode: unsupported inputs: {reason}")
    batch, heads, n, dim = q.shape
    group = heads // kv.num_kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    rows = group * n
    block_d = head_dim_pad(dim)
    block_m = row_tile(rows, dim)
    row_tiles = math.ceil(rows / block_m)
    rows_padded = row_tiles * block_m
    programs_per_split = batch * kv.num_kv_heads * row_tiles
    split_len = _split_len(kv, programs_per_split, q.device)
    num_splits = math.ceil((kv.max_length + kv.capacity) / split_len)

    mid_o = torch.empty(
        batch * kv.num_kv_heads, num_splits, rows_padded, dim, dtype=torch.float32, device=q.device
    )
    mid_lse = torch.empty(
        batch * kv.num_kv_heads, num_splits, rows_padded, dtype=torch.float32, device=q.device
    )
    split_kernel[(batch * kv.num_kv_heads, num_splits, row_tiles)](
        q,
        kv.k_packed,
        kv.v_packed,
        kv.offsets,
        kv.lengths,
        kv.k_tail,
        kv.v_tail,
        kv.tail_length,
        mid_o,
        mid_lse,
        scale * LOG2E,
        n,
        group,
        kv.num_kv_heads,
        split_len,
        num_splits,
        rows_padded,
        *q.stride(),
        *kv.k_packed.stride(),
        *kv.v_packed.stride(),
        *kv.k_tail.stride(),
        *kv.v_tail.stride(),
        HEAD_DIM=dim,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=key_tile(dim, q.element_size()),
        FP32_DOT=needs_fp32_dot(q.dtype),
    )
    out = q.new_empty(q.shape)  # contiguous, as the reference returns it
    lse = torch.empty(batch, heads, n, dtype=torch.float32, device=q.device)
    _combine_kernel[(batch * kv.num_kv_heads, row_tiles)](
        mid_o,
        mid_lse,
        out,
        lse,
        n,
        group,
        kv.num_kv_heads,
        num_splits,
        rows_padded,
        *out.stride(),
        *lse.stride(),
        HEAD_DIM=dim,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
    )
    return out, lse
