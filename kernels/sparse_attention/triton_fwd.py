"""Block-sparse flash-attention forward in Triton, reading a `BlockSelection`: `sparse_attention`, as
`reference.sparse_attention` with the same arguments (and a `launch.LaunchConfig`).

One program computes one query tile (``BLOCK_M`` rows of one query block) of one query head. It
walks the head's selected key blocks (``kv_indices``, ascending) in two loops: first the blocks that
need no mask at all (strictly below the diagonal, wholly inside a sliding window, in range, no
``attn_mask``: a contiguous run of the sorted list), then the rest, masked per element (the
window's lower-edge blocks before that run; the diagonal block, a partial last block after it;
every block when an ``attn_mask`` is given). Each program counts the run's bounds on its own list
(`_mask_free_run`: vector loads of the indices, no torch ops per call), so arbitrary selections
stay correct. Online softmax in base 2, fp32
accumulation. Additive masks: values <= finfo.min / 2 count as -inf (`masks.masked_floor`). A logit
soft-cap (``softcap``, `softcap` module) caps the base-2 scores before the mask (``SOFTCAP``, a
constexpr: without it the kernel is the uncapped one; with it the mask-free run no longer folds the
scale into the row max).

K/V tiles are read through pointers or, with ``LaunchConfig.tma`` (the default at head dim 128, where
it measured 4-6% faster on an H100), through host TMA descriptors of the [B, Hkv, Skv, D] tensors
(out-of-range rows and padded columns read as zeros; traced or unaligned tensors take the pointers).

Head dims: multiples of 16 up to 256 (`triton_utils.MAX_HEAD_DIM`); non-powers of two (80, 96) run
on a padded ``tl.arange`` with masked loads and stores on the head dim.

GQA is per query head, not per KV group: the selection differs per query head, so a group-wide
program would iterate the union of its heads' lists and waste ``union - own`` blocks of work per
head, and its accumulators (G x BLOCK_M x D fp32) do not fit in registers for G >= 4, D = 128.
Instead the launch order puts the G heads of a group for the same query block on consecutive
programs, so the K/V blocks they share are read from L2 rather than HBM.

Schedule: programs run (batch, KV head, query block) units in the order of a work list read by
program id (`launch.unit_order`, picked by ``LaunchConfig.schedule``). ``"heaviest_first"``: units
sorted by their heaviest head's selected-block count, descending, one device argsort of
B * Hkv * nq ints, so that with per-head or per-group budgets the long programs start first and the
short ones fill the tail. ``"causal"`` (the default): the last query block first (the longest under
a causal mask), computed from the program id (no list). The order changes no result.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..masks import check_window, masked_floor
from ..selection.block_selection import BlockSelection
from ..softcap import check_softcap
from ..triton_utils import (
    LOG2E,
    LOG2E_JIT,
    as_fp32,
    head_dim_pad,
    head_dim_reason,
    interpreting,
    needs_fp32_dot,
    run_kernel,
    soft_cap,
    softmax_finish,
    softmax_step,
    tile_dot,
    tma_descriptors,
)
from .launch import LaunchConfig, default_launch, unit_order

# Entries of a selected list `_mask_free_run` counts per step.
_SCAN = tl.constexpr(128)

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def supported(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> str | None:
    """None when `sparse_attention` can run these inputs, else the reason it cannot."""
    if q.device.type != "cuda" and not interpreting():
        return f"device {q.device.type} needs CUDA (or TRITON_INTERPRET=1)"
    if q.dtype not in _DTYPES or not (q.dtype == k.dtype == v.dtype):
        return f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}: need one of bf16, fp16, fp32"
    if q.dtype == torch.float32 and not interpreting():
        return "fp32 on CUDA: the kernel's exact-fp32 path spills registers (it serves the interpreter)"
    reason = head_dim_reason(q.shape[-1], k.shape[-1], v.shape[-1])
    if reason is not None:
        return reason
    if q.shape[1] % k.shape[1]:
        return f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads"
    if attn_mask is not None and attn_mask.dim() > 4:
        return f"attn_mask has {attn_mask.dim()} dims (at most 4)"
    return None


def _check_selection(q: Tensor, k: Tensor, selection: BlockSelection) -> None:
    batch, heads, q_len = q.shape[:3]
    kv_len, b = k.shape[2], selection.block_size
    expected = (batch, heads, triton.cdiv(q_len, b), triton.cdiv(kv_len, b))
    if (selection.q_len, selection.kv_len) != (q_len, kv_len) or tuple(
        selection.kv_indices.shape
    ) != expected:
        raise ValueError(
            f"selection for Sq={selection.q_len}, Skv={selection.kv_len}, indices "
            f"{tuple(selection.kv_indices.shape)} does not fit q {tuple(q.shape)}, k {tuple(k.shape)} "
            f"(expected indices {expected})"
        )


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selection: BlockSelection,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
    *,
    window: int | None = None,
    softcap: float | None = None,
    launch: LaunchConfig | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of each query block over its selected key blocks only.

    Args:
        q: [B, H, Sq, D]; k, v: [B, Hkv, Skv, D] (H % Hkv == 0); bf16, fp16 or fp32, one dtype.
        selection: the key blocks per (batch, query head, query block).
        attn_mask: None, bool (True = keep) or additive float, broadcastable to [B, H, Sq, Skv].
        is_causal: top-left causal mask (query row r sees key c <= r), as SDPA.
        scale: score scale; None = 1/sqrt(D).
        window: causal sliding window (``masks``): row r sees keys (r - window, r]; needs
            is_causal=True and no attn_mask.
        softcap: logit soft-cap (`softcap` module): scores s = scale * q . k become
            softcap * tanh(s / softcap) before the mask; None: no cap.
        launch: tile/schedule override (benchmarks); None = `launch.default_launch`.

    Returns:
        out [B, H, Sq, D] in q.dtype (laid out as [B, Sq, H, D]) and lse float32 [B, H, Sq] (natural
        log). Rows with no attended key give out 0 and lse -inf.
    """
    reason = supported(q, k, v, attn_mask)
    if reason is not None:
        raise ValueError(f"triton sparse_attention: {reason}")
    check_window(window, is_causal, attn_mask)
    check_softcap(softcap)
    _check_selection(q, k, selection)
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    b = selection.block_size
    cfg = launch or default_launch(b, q.dtype, attn_mask is not None, head_dim)
    if b % cfg.block_m or b % cfg.block_n:
        raise ValueError(f"triton sparse_attention: {cfg} does not tile the block size {b}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if scale < 0:  # q . k * scale == (-q) . k * (-scale), exactly; the kernel wants scale >= 0
        q, scale = -q, -scale

    out = q.new_empty((batch, q_len, heads, head_dim)).transpose(1, 2)  # [B, Sq, H, D] in memory, as SDPA's
    lse = torch.empty((batch, heads, q_len), dtype=torch.float32, device=q.device)
    kv_indices = selection.kv_indices.contiguous()
    kv_num_blocks = selection.kv_num_blocks.contiguous()
    order = unit_order(kv_num_blocks, kv_heads, cfg.schedule)
    mask_floor = 0.0
    if attn_mask is None:
        mask, mask_kind, mask_strides = q, 0, (0, 0, 0, 0)
    else:
        mask = attn_mask.expand(batch, heads, q_len, kv_len)
        mask_kind, mask_strides = (1 if mask.dtype == torch.bool else 2), mask.stride()
        if mask_kind == 2:
            mask_floor = masked_floor(mask.dtype)

    nq = selection.num_q_blocks
    grid = (batch * heads * nq * (b // cfg.block_m),)
    descs = tma_descriptors((k, v), cfg.block_n, head_dim_pad(head_dim)) if cfg.tma else None
    run_kernel(
        sparse_fwd_kernel,
        grid,
        q,
        k,
        v,
        *(descs or (k, v)),  # read only when TMA
        out,
        lse,
        kv_num_blocks,
        kv_indices,
        kv_num_blocks if order is None else order,  # read only when ORDERED
        mask,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        *mask_strides,
        kv_heads,
        q_len,
        kv_len,
        nq,
        selection.num_kv_blocks,
        scale * LOG2E,
        (softcap or 1.0) * LOG2E,  # base 2; read only when SOFTCAP
        0 if window is None else window,
        mask_floor,
        GROUP=heads // kv_heads,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad(head_dim),
        SPARSE_BLOCK=b,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        IS_CAUSAL=is_causal,
        WINDOWED=window is not None,
        MASK_KIND=mask_kind,
        SOFTCAP=softcap is not None,
        FP32_DOT=needs_fp32_dot(q.dtype),
        ORDERED=order is not None,
        TMA=descs is not None,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out, lse


@triton.jit
def _load_rows(
    base,
    offs_n,
    stride_n,
    offs_d,
    kv_len,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    MASKED: tl.constexpr,
):
    """[BLOCK_N, HEAD_DIM_PAD] rows ``offs_n`` of K or V; masks only what may be out of range."""
    ptrs = base + offs_n[:, None] * stride_n
    if MASKED:
        if HEAD_DIM == HEAD_DIM_PAD:
            rows = tl.load(ptrs, mask=offs_n[:, None] < kv_len, other=0.0)
        else:
            rows = tl.load(ptrs, mask=(offs_n[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif HEAD_DIM == HEAD_DIM_PAD:
        rows = tl.load(ptrs)
    else:
        rows = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return rows


@triton.jit
def _attend_block(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    k_desc,
    v_desc,
    desc_at,
    mask_base,
    block,
    part,
    offs_m,
    stride_kn,
    stride_vn,
    stride_mn,
    kv_len,
    qk_scale,
    softcap,
    window,
    mask_floor,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    SPARSE_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    MASK_KIND: tl.constexpr,
    SOFTCAP: tl.constexpr,
    FP32_DOT: tl.constexpr,
    MASKED: tl.constexpr,
    TMA: tl.constexpr,
):
    """One online-softmax step (`softmax_step`) of the rows ``offs_m`` over keys [part * BLOCK_N,
    (part + 1) * BLOCK_N) of key block ``block``.

    ``k_base``/``v_base`` already hold the head's base plus the [1, HEAD_DIM_PAD] column offsets.
    MASKED: per-element masks (key range, causal with its ``window``, attn_mask with additive values
    <= ``mask_floor`` as -inf). SOFTCAP: the scaled scores capped at the base-2 ``softcap`` first.
    TMA: K and V tiles through the [B, Hkv, Skv, D] descriptors ``k_desc``/``v_desc`` at (batch, KV
    head) ``desc_at`` (out-of-range rows and padded columns read as zeros), else pointer loads.
    """
    n0 = block * SPARSE_BLOCK + part * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if TMA:
        k = k_desc.load([desc_at[0], desc_at[1], n0, 0]).reshape(BLOCK_N, HEAD_DIM_PAD)
        v = v_desc.load([desc_at[0], desc_at[1], n0, 0]).reshape(BLOCK_N, HEAD_DIM_PAD)
    else:
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        k = _load_rows(k_base, offs_n, stride_kn, offs_d, kv_len, HEAD_DIM, HEAD_DIM_PAD, MASKED)
        v = _load_rows(v_base, offs_n, stride_vn, offs_d, kv_len, HEAD_DIM, HEAD_DIM_PAD, MASKED)
    s = tile_dot(q, tl.trans(k), None, FP32_DOT)
    if MASKED:
        s = s * qk_scale
        if SOFTCAP:
            s, _ = soft_cap(s, softcap)
        keep = offs_n[None, :] < kv_len
        if IS_CAUSAL:
            keep = keep & (offs_m[:, None] >= offs_n[None, :])
        if WINDOWED:
            keep = keep & (offs_n[None, :] > offs_m[:, None] - window)
        if MASK_KIND == 1:
            keep = keep & (tl.load(mask_base + offs_n[None, :] * stride_mn, mask=keep, other=0) != 0)
        if MASK_KIND == 2:
            bias = tl.load(mask_base + offs_n[None, :] * stride_mn, mask=keep, other=0.0).to(tl.float32)
            keep = keep & (bias > mask_floor)
            s = s + tl.where(keep, bias, 0.0) * LOG2E_JIT
        m_i, p, alpha = softmax_step(m_i, tl.where(keep, s, float("-inf")), 1.0, True)
    elif SOFTCAP:
        s, _ = soft_cap(s * qk_scale, softcap)
        m_i, p, alpha = softmax_step(m_i, s, 1.0, False)
    else:
        # qk_scale >= 0 (the wrapper flips the sign of q otherwise): scale the row max, then one
        # fused multiply-add per score.
        m_i, p, alpha = softmax_step(m_i, s, qk_scale, False)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tile_dot(p.to(v.dtype), v, acc * alpha[:, None], FP32_DOT)
    return acc, l_i, m_i


@triton.jit
def _attend_run(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    k_desc,
    v_desc,
    desc_at,
    mask_base,
    idx_ptr,
    lo,
    hi,
    n_blocks,
    offs_m,
    stride_kn,
    stride_vn,
    stride_mn,
    kv_len,
    nk,
    qk_scale,
    softcap,
    window,
    mask_floor,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    SPARSE_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    MASK_KIND: tl.constexpr,
    SOFTCAP: tl.constexpr,
    FP32_DOT: tl.constexpr,
    MASKED: tl.constexpr,
    TMA: tl.constexpr,
):
    """`_attend_block` over part of the head's selected list ``idx_ptr`` [n_blocks], in
    SPARSE_BLOCK / BLOCK_N parts a block: MASKED=False the mask-free run, positions [lo, hi);
    MASKED=True the rest, [0, lo) and [hi, n_blocks), with per-element masks.

    The next step's block index is loaded one step ahead (loop-carried), so the software pipeliner
    can issue K/V loads num_stages - 1 steps early (an index loaded in the same step would cost a
    stage).
    """
    n_split: tl.constexpr = SPARSE_BLOCK // BLOCK_N
    # Positions [start, stop); a position p >= gap_at reads entry p + gap (skipping the other run).
    if MASKED:
        start, stop, gap_at, gap = 0, n_blocks - (hi - lo), lo, hi - lo
    else:
        start, stop, gap_at, gap = lo, hi, 0, 0
    block = tl.load(idx_ptr + tl.minimum(start + gap * (start >= gap_at), nk - 1))
    for it in tl.range(start * n_split, stop * n_split):
        pos = (it + 1) // n_split
        nxt = tl.load(idx_ptr + tl.minimum(pos + gap * (pos >= gap_at), nk - 1))
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, desc_at, mask_base, block, it % n_split,
            offs_m, stride_kn, stride_vn, stride_mn, kv_len, qk_scale, softcap, window, mask_floor,
            HEAD_DIM, HEAD_DIM_PAD, SPARSE_BLOCK, BLOCK_N, IS_CAUSAL, WINDOWED, MASK_KIND, SOFTCAP, FP32_DOT,
            MASKED, TMA,
        )  # fmt: skip
        block = nxt
    return acc, l_i, m_i


@triton.jit
def _mask_free_run(
    idx_ptr,
    n_blocks,
    qblock,
    kv_len,
    window,
    SPARSE_BLOCK: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    MASK_KIND: tl.constexpr,
):
    """Positions [lo, hi) of query block ``qblock``'s ascending list ``idx_ptr`` [n_blocks] that need
    no mask: key blocks j that are full (j < kv_len // b), strictly below the diagonal (j < qblock,
    causal) and wholly inside the window for every row of the block (j * b > (qblock + 1) * b - 1 -
    window), with no attn_mask. They are one contiguous run of the sorted list; its bounds are counts
    of the blocks before it and after it, over the whole list (any selection, not only those the
    selection kernels make), ``_SCAN`` entries at a time (one step for lists up to that long)."""
    if MASK_KIND != 0:
        lo = 0
        hi = 0
    else:
        stop = kv_len // SPARSE_BLOCK
        if IS_CAUSAL:
            stop = tl.minimum(stop, qblock)
        start = 0
        if WINDOWED:
            edge = (qblock + 1) * SPARSE_BLOCK - 1 - window
            start = tl.where(edge >= 0, edge // SPARSE_BLOCK + 1, 0)
        before = tl.zeros([], dtype=tl.int32)
        after = tl.zeros([], dtype=tl.int32)
        for first in range(0, n_blocks, _SCAN):
            offs = first + tl.arange(0, _SCAN)
            in_list = offs < n_blocks
            block = tl.load(idx_ptr + offs, mask=in_list, other=0)
            if WINDOWED:
                before += tl.sum((in_list & (block < start)).to(tl.int32))
            after += tl.sum((in_list & (block >= stop)).to(tl.int32))
        lo = before
        hi = tl.maximum(lo, n_blocks - after)
    return lo, hi


@triton.jit
def sparse_fwd_kernel(
    Q,
    K,
    V,
    K_DESC,
    V_DESC,
    O,
    LSE,
    KV_NUM,
    KV_IDX,
    ORDER,
    MASK,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    kv_heads,
    q_len,
    kv_len,
    nq,
    nk,
    qk_scale,
    softcap,
    window,
    mask_floor,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    SPARSE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    MASK_KIND: tl.constexpr,
    SOFTCAP: tl.constexpr,
    FP32_DOT: tl.constexpr,
    ORDERED: tl.constexpr,
    TMA: tl.constexpr,
):
    # Program order, fastest first: head within its KV group, query tile, then the work list ORDER
    # of (batch, KV head, query block) units (`launch.unit_order`), or without ORDERED the causal
    # order (each (batch, KV head)'s last query block first).
    m_split: tl.constexpr = SPARSE_BLOCK // BLOCK_M
    qk_scale, softcap, mask_floor = as_fp32(qk_scale), as_fp32(softcap), as_fp32(mask_floor)
    pid = tl.program_id(0)
    g = pid % GROUP
    rest = pid // GROUP
    m_sub = rest % m_split
    if ORDERED:
        unit = tl.load(ORDER + rest // m_split)
    else:
        unit = rest // m_split
        unit = unit - unit % nq + nq - 1 - unit % nq
    qblock = unit % nq
    rest = unit // nq
    hkv = (rest % kv_heads).to(tl.int64)
    batch = (rest // kv_heads).to(tl.int64)
    head = hkv * GROUP + g

    offs_m = qblock * SPARSE_BLOCK + m_sub * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q_ptrs = (
        Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    )
    row_ok = offs_m[:, None] < q_len
    q = tl.load(q_ptrs, mask=row_ok & (offs_d[None, :] < HEAD_DIM), other=0.0)

    k_base = K + batch * stride_kb + hkv * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + batch * stride_vb + hkv * stride_vh + offs_d[None, :] * stride_vd
    mask_base = MASK + batch * stride_mb + head * stride_mh + offs_m.to(tl.int64)[:, None] * stride_mm
    sel = (batch * (kv_heads * GROUP) + head) * nq + qblock
    n_blocks = tl.load(KV_NUM + sel)
    idx_ptr = KV_IDX + sel * nk

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    # The mask-free run [lo, hi) of the list first, then the rest, [0, lo) and [hi, n_blocks), masked.
    lo, hi = _mask_free_run(
        idx_ptr, n_blocks, qblock, kv_len, window, SPARSE_BLOCK, IS_CAUSAL, WINDOWED, MASK_KIND
    )
    desc_at = (batch.to(tl.int32), hkv.to(tl.int32))
    for run in tl.static_range(2):
        acc, l_i, m_i = _attend_run(
            acc, l_i, m_i, q, k_base, v_base, K_DESC, V_DESC, desc_at, mask_base, idx_ptr, lo, hi,
            n_blocks, offs_m, stride_kn, stride_vn, stride_mn, kv_len, nk, qk_scale, softcap, window,
            mask_floor, HEAD_DIM, HEAD_DIM_PAD, SPARSE_BLOCK, BLOCK_N, IS_CAUSAL, WINDOWED, MASK_KIND,
            SOFTCAP, FP32_DOT, run == 1, TMA,
        )  # fmt: skip
    out, lse = softmax_finish(acc, m_i, l_i)
    o_ptrs = (
        O + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    )
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok & (offs_d[None, :] < HEAD_DIM))
    tl.store(LSE + (batch * (kv_heads * GROUP) + head) * q_len + offs_m, lse, mask=offs_m < q_len)
