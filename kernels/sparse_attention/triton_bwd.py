"""Triton backward of OmniSparse sparse attention over exactly the selected blocks:
`sparse_attention_backward`, the gradients autograd takes of `reference.sparse_attention`.

FlashAttention-2 style launches, reusing the forward's log-sum-exp:

1. `_preprocess`: per query row, delta = rowsum(dO * O) and the lse in base 2 (+inf for a fully
   masked row, so its probabilities, hence all its gradients, are exactly 0).
2. `dq_kernel`: one program per (batch, query head, query tile) walks the tile's selected key
   blocks (``kv_indices``) and accumulates dq = scale * sum_j dS_ij K_j.
3. `dkdv_kernel`: one program per (batch, KV head, key tile, chunk) walks, over the query heads
   of its GQA group, the query blocks that selected the tile's key block (the transposed
   selection, `transpose_selection`), and accumulates dv = P^T dO and dk = scale * dS^T Q. The
   group's heads are summed inside the program, so dk and dv come out shaped like k and v.
   A key block chosen by many query blocks (a sink block is chosen by all of them) would make one
   program walk nq * G blocks while the others walk a few, so a list longer than ``dkdv_chunk``
   entries is cut into chunks, one program each, summed with float32 atomics into a scratch
   buffer; `_dkdv_finalize` then casts those tiles. A tile with a short list (most of them) is
   stored directly by its one program: no atomics, no scratch traffic.

With P = exp(scale * Q K^T + bias - lse), dP = dO V^T, dS = P * (dP - delta). Causal masking
(top-left aligned) is applied only on tiles that cross the diagonal or, with a sliding ``window``,
the band's lower edge; the key bound only on tiles past the last key. Additive masks: values
<= finfo.min / 2 count as -inf (`masks.masked_floor`). A logit soft-cap (``SOFTCAP``, a constexpr:
without it the kernels are the uncapped ones) caps the scaled scores x into c = cap * tanh(x / cap)
before the mask, so dS is taken with respect to c and multiplied by dc/dx = 1 - tanh^2(x / cap).
Head dims: multiples of 16 up to 256, non-powers of two on a padded, masked head-dim range.
All accumulation is float32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..masks import check_window, masked_floor
from ..selection.block_selection import BlockSelection
from ..selection.transpose import transpose_selection
from ..softcap import check_softcap
from ..triton_utils import (
    LOG2E,
    LOG2E_JIT,
    as_fp32,
    head_dim_pad,
    head_dim_reason,
    interpreting,
    needs_fp32_dot,
    soft_cap,
    tile_dot,
)
from .launch import LaunchConfig, default_backward_launch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# attn_mask kinds, a constexpr of the kernels.
_NO_MASK, _BOOL_MASK, _ADDITIVE_MASK = 0, 1, 2


def supported(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
) -> str | None:
    """None when `sparse_attention_backward` can run these inputs, else the reason it cannot."""
    if q.device.type != "cuda" and not interpreting():
        return f"tensors on {q.device.type} (CUDA needed, or TRITON_INTERPRET=1)"
    if not (q.device == k.device == v.device):
        return "q, k, v on different devices"
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        return "q, k, v must be 4-D with k and v of one shape"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype} (one of {_DTYPES} needed)"
    if q.shape[0] != k.shape[0] or q.shape[1] % k.shape[1]:
        return f"q {tuple(q.shape)} and k {tuple(k.shape)}: batch differs or heads not a multiple of KV heads"
    reason = head_dim_reason(q.shape[3], k.shape[3])
    if reason is not None:
        return reason
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            return f"attn_mask dtype {attn_mask.dtype} (bool or floating needed)"
        if attn_mask.device != q.device:
            return "attn_mask on another device than q"
        try:
            torch.broadcast_shapes(attn_mask.shape, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        except RuntimeError:
            return f"attn_mask {tuple(attn_mask.shape)} does not broadcast to [B, H, Sq, Skv]"
    return None


@triton.jit
def _preprocess(
    O,
    DO,
    LSE,
    DELTA,
    LSE2,
    s_ob,
    s_oh,
    s_os,
    s_od,
    s_dob,
    s_doh,
    s_dos,
    s_dod,
    s_lb,
    s_lh,
    s_ls,
    H,
    q_len,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    """delta [B*H, Sq] = rowsum(dO * O); lse2 [B*H, Sq] = lse * log2(e), +inf where lse = -inf."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_ok = offs_m < q_len
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(
        O + b * s_ob + h * s_oh + offs_m[:, None] * s_os + offs_d[None, :] * s_od, mask=tile_ok, other=0.0
    )
    do = tl.load(
        DO + b * s_dob + h * s_doh + offs_m[:, None] * s_dos + offs_d[None, :] * s_dod,
        mask=tile_ok,
        other=0.0,
    )
    lse = tl.load(LSE + b * s_lb + h * s_lh + offs_m * s_ls, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E_JIT)
    out = pid_bh.to(tl.int64) * q_len + offs_m
    tl.store(DELTA + out, tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1), mask=row_ok)
    tl.store(LSE2 + out, lse2, mask=row_ok)


@triton.jit
def _load_tile(base, offs_s, strides, offs_d, seq_len, HEAD_DIM: tl.constexpr):
    """[len(offs_s), HEAD_DIM_PAD] rows ``offs_s`` of a [seq_len, HEAD_DIM] matrix at ``base``, zero
    outside; ``strides``: the [B, H, S, D] tensor's."""
    return tl.load(
        base + offs_s[:, None] * strides[2] + offs_d[None, :] * strides[3],
        mask=(offs_s[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )


@triton.jit
def _scores(
    a,
    b_t,
    qk_scale,
    softcap,
    mask_base,
    mask_strides,
    q_offs,
    k_offs,
    q_len,
    kv_len,
    mask_floor,
    MASK_KIND: tl.constexpr,
    SOFTCAP: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """``(s, d_cap)``: base-2 scores (a @ b_t) * scale * log2(e) (SOFTCAP: capped at the base-2
    ``softcap``) plus the tile's attn_mask (additive values <= ``mask_floor`` give -inf), and the
    cap's derivative 1 - tanh^2 per score (SOFTCAP only; 1.0 without).

    ``q_offs`` / ``k_offs`` are the query / key positions broadcast to the tile's shape (either may
    run along the rows); ``mask_base`` points at this (batch, head)'s attn_mask [B, H, Sq, Skv] of
    ``mask_strides``.
    """
    s = tile_dot(a, b_t, None, FP32_DOT) * qk_scale
    d_cap = 1.0
    if SOFTCAP:
        s, t = soft_cap(s, softcap)
        d_cap = 1.0 - t * t
    if MASK_KIND != 0:
        in_bounds = (q_offs < q_len) & (k_offs < kv_len)
        m = tl.load(mask_base + q_offs * mask_strides[2] + k_offs * mask_strides[3], mask=in_bounds, other=0)
        if MASK_KIND == 1:
            s = tl.where(m != 0, s, float("-inf"))
        else:
            m = m.to(tl.float32)
            s = tl.where(m > mask_floor, s + m * LOG2E_JIT, float("-inf"))
    return s, d_cap


@triton.jit
def dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    MASK,
    LSE2,
    DELTA,
    KV_NUM,
    KV_IDX,
    q_strides,
    k_strides,
    v_strides,
    do_strides,
    dq_strides,
    mask_strides,
    num_strides,
    idx_strides,
    KV_HEADS,
    q_len,
    kv_len,
    n_tiles,
    scale,
    qk_scale,
    softcap,
    window,
    mask_floor,
    GROUP: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    SOFTCAP: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    # Program order, fastest first: head within its GQA group (the group shares K/V blocks, read
    # from L2), query tile from the last (causal rows near the end are the longest), KV head, batch.
    qk_scale, softcap, mask_floor = as_fp32(qk_scale), as_fp32(softcap), as_fp32(mask_floor)
    pid = tl.program_id(0)
    g = pid % GROUP
    rest = pid // GROUP
    tile = n_tiles - 1 - rest % n_tiles
    rest = rest // n_tiles
    hk = (rest % KV_HEADS).to(tl.int64)
    b = (rest // KV_HEADS).to(tl.int64)
    h = hk * GROUP + g
    m0 = tile * BLOCK_M
    block_i = m0 // BLOCK
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q = _load_tile(Q + b * q_strides[0] + h * q_strides[1], offs_m, q_strides, offs_d, q_len, HEAD_DIM)
    do = _load_tile(DO + b * do_strides[0] + h * do_strides[1], offs_m, do_strides, offs_d, q_len, HEAD_DIM)
    row = (b * KV_HEADS * GROUP + h) * q_len + offs_m
    lse2 = tl.load(LSE2 + row, mask=offs_m < q_len, other=float("inf"))
    delta = tl.load(DELTA + row, mask=offs_m < q_len, other=0.0)
    k_base = K + b * k_strides[0] + hk * k_strides[1]
    v_base = V + b * v_strides[0] + hk * v_strides[1]
    mask_base = MASK + b * mask_strides[0] + h * mask_strides[1]
    idx_base = KV_IDX + b * idx_strides[0] + h * idx_strides[1] + block_i * idx_strides[2]
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    num_selected = tl.load(KV_NUM + b * num_strides[0] + h * num_strides[1] + block_i * num_strides[2])
    for t in range(num_selected):
        block_j = tl.load(idx_base + t * idx_strides[3])
        for sub in tl.static_range(BLOCK // BLOCK_N):
            n0 = block_j * BLOCK + sub * BLOCK_N
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k = _load_tile(k_base, offs_n, k_strides, offs_d, kv_len, HEAD_DIM)
            v = _load_tile(v_base, offs_n, v_strides, offs_d, kv_len, HEAD_DIM)
            s, d_cap = _scores(
                q,
                tl.trans(k),
                qk_scale,
                softcap,
                mask_base,
                mask_strides,
                offs_m[:, None],
                offs_n[None, :],
                q_len,
                kv_len,
                mask_floor,
                MASK_KIND,
                SOFTCAP,
                FP32_DOT,
            )
            needs_mask = n0 + BLOCK_N > kv_len
            if IS_CAUSAL:  # the diagonal, and the window's lower edge
                needs_mask = needs_mask | (n0 + BLOCK_N - 1 > m0) | (n0 <= m0 + BLOCK_M - 1 - window)
            if needs_mask:
                keep = offs_n[None, :] < kv_len
                if IS_CAUSAL:
                    rows = offs_m[:, None]
                    keep = keep & (offs_n[None, :] <= rows) & (offs_n[None, :] > rows - window)
                s = tl.where(keep, s, float("-inf"))
            p = tl.math.exp2(s - lse2[:, None])
            dp = tile_dot(do, tl.trans(v), None, FP32_DOT)
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * d_cap
            dq = tile_dot(ds.to(k.dtype), k, dq, FP32_DOT)
    dq *= scale
    tl.store(
        DQ
        + b * dq_strides[0]
        + h * dq_strides[1]
        + offs_m[:, None] * dq_strides[2]
        + offs_d[None, :] * dq_strides[3],
        dq.to(DQ.dtype.element_ty),
        mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM),
    )


@triton.jit
def _group_count(Q_NUM, num_strides, b, hk, block_j, GROUP: tl.constexpr):
    """Entries of key block ``block_j``'s list summed over the query heads of KV head ``hk``."""
    total = tl.load(Q_NUM + b * num_strides[0] + hk * GROUP * num_strides[1] + block_j * num_strides[2])
    for g in range(1, GROUP):
        total += tl.load(
            Q_NUM + b * num_strides[0] + (hk * GROUP + g) * num_strides[1] + block_j * num_strides[2]
        )
    return total


@triton.jit
def dkdv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    DK32,
    DV32,
    MASK,
    LSE2,
    DELTA,
    Q_NUM,
    Q_IDX,
    q_strides,
    k_strides,
    v_strides,
    do_strides,
    mask_strides,
    num_strides,
    idx_strides,
    KV_HEADS,
    BATCH_KV_HEADS,
    q_len,
    kv_len,
    n_tiles,
    chunk,
    scale,
    qk_scale,
    softcap,
    window,
    mask_floor,
    GROUP: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    SOFTCAP: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """dk, dv (DK, DV, like k and v: contiguous [B, Hkv, Skv, D]) of one key tile and one chunk.

    Short lists (<= chunk entries) are stored into DK, DV by chunk 0; long ones are added into
    the float32 scratch DK32, DV32 (same layout) by every chunk that holds entries.
    """
    # Program order, fastest first: (batch, KV head), key tile, chunk. Low key blocks (the sink,
    # and under causal masking the blocks most query blocks may choose) start first; programs of
    # later chunks are mostly empty and return after reading the counts.
    qk_scale, softcap, mask_floor = as_fp32(qk_scale), as_fp32(softcap), as_fp32(mask_floor)
    pid = tl.program_id(0)
    bhk = pid % BATCH_KV_HEADS
    rest = pid // BATCH_KV_HEADS
    tile = rest % n_tiles
    first = (rest // n_tiles) * chunk
    b = (bhk // KV_HEADS).to(tl.int64)
    hk = (bhk % KV_HEADS).to(tl.int64)
    n0 = tile * BLOCK_N
    block_j = n0 // BLOCK
    total = _group_count(Q_NUM, num_strides, b, hk, block_j, GROUP)
    if (first < total) | (first == 0):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        k = _load_tile(K + b * k_strides[0] + hk * k_strides[1], offs_n, k_strides, offs_d, kv_len, HEAD_DIM)
        v = _load_tile(V + b * v_strides[0] + hk * v_strides[1], offs_n, v_strides, offs_d, kv_len, HEAD_DIM)
        dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
        # This program takes entries [first, first + chunk) of the group's list; head g's
        # entries are numbered from `seen`, the count of the group's earlier heads.
        seen = total * 0
        for g in range(GROUP):
            h = hk * GROUP + g
            q_base = Q + b * q_strides[0] + h * q_strides[1]
            do_base = DO + b * do_strides[0] + h * do_strides[1]
            row_base = (b * KV_HEADS * GROUP + h) * q_len
            mask_base = MASK + b * mask_strides[0] + h * mask_strides[1]
            idx_base = Q_IDX + b * idx_strides[0] + h * idx_strides[1] + block_j * idx_strides[2]
            count = tl.load(Q_NUM + b * num_strides[0] + h * num_strides[1] + block_j * num_strides[2])
            lo = tl.maximum(first - seen, 0)
            hi = tl.minimum(first + chunk - seen, count)
            seen += count
            for t in range(lo, hi):
                block_i = tl.load(idx_base + t * idx_strides[3])
                for sub in tl.static_range(BLOCK // BLOCK_M):
                    m0 = block_i * BLOCK + sub * BLOCK_M
                    offs_m = m0 + tl.arange(0, BLOCK_M)
                    q = _load_tile(q_base, offs_m, q_strides, offs_d, q_len, HEAD_DIM)
                    do = _load_tile(do_base, offs_m, do_strides, offs_d, q_len, HEAD_DIM)
                    lse2 = tl.load(LSE2 + row_base + offs_m, mask=offs_m < q_len, other=float("inf"))
                    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < q_len, other=0.0)
                    # Transposed tile: rows are this program's keys, columns the block's queries.
                    s_t, d_cap_t = _scores(
                        k,
                        tl.trans(q),
                        qk_scale,
                        softcap,
                        mask_base,
                        mask_strides,
                        offs_m[None, :],
                        offs_n[:, None],
                        q_len,
                        kv_len,
                        mask_floor,
                        MASK_KIND,
                        SOFTCAP,
                        FP32_DOT,
                    )
                    if IS_CAUSAL:  # noqa: SIM102 (a compile-time test around a run-time one)
                        # Keys past the end need no mask: their rows of dk, dv are never stored.
                        if (n0 + BLOCK_N - 1 > m0) | (n0 <= m0 + BLOCK_M - 1 - window):
                            rows = offs_m[None, :]
                            band = (offs_n[:, None] <= rows) & (offs_n[:, None] > rows - window)
                            s_t = tl.where(band, s_t, float("-inf"))
                    p_t = tl.math.exp2(s_t - lse2[None, :])
                    dv = tile_dot(p_t.to(do.dtype), do, dv, FP32_DOT)
                    dp_t = tile_dot(v, tl.trans(do), None, FP32_DOT)
                    ds_t = p_t * (dp_t - delta[None, :])
                    if SOFTCAP:
                        ds_t = ds_t * d_cap_t
                    dk = tile_dot(ds_t.to(q.dtype), q, dk, FP32_DOT)
        dk *= scale
        out_ok = (offs_n[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM)
        offs = ((b * KV_HEADS + hk) * kv_len + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
        if total <= chunk:
            tl.store(DK + offs, dk.to(DK.dtype.element_ty), mask=out_ok)
            tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=out_ok)
        else:
            tl.atomic_add(DK32 + offs, dk, mask=out_ok)
            tl.atomic_add(DV32 + offs, dv, mask=out_ok)


@triton.jit
def _dkdv_finalize(
    DK,
    DV,
    DK32,
    DV32,
    Q_NUM,
    num_strides,
    KV_HEADS,
    BATCH_KV_HEADS,
    kv_len,
    chunk,
    GROUP: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    """Cast the scratch sums of the key tiles whose lists were chunked into DK, DV."""
    pid = tl.program_id(0)
    bhk = pid % BATCH_KV_HEADS
    tile = pid // BATCH_KV_HEADS
    b = (bhk // KV_HEADS).to(tl.int64)
    hk = (bhk % KV_HEADS).to(tl.int64)
    n0 = tile * BLOCK_N
    if _group_count(Q_NUM, num_strides, b, hk, n0 // BLOCK, GROUP) > chunk:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        ok = (offs_n[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM)
        offs = ((b * KV_HEADS + hk) * kv_len + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
        tl.store(DK + offs, tl.load(DK32 + offs, mask=ok).to(DK.dtype.element_ty), mask=ok)
        tl.store(DV + offs, tl.load(DV32 + offs, mask=ok).to(DV.dtype.element_ty), mask=ok)


def _mask_operand(attn_mask: torch.Tensor | None, shape: tuple[int, int, int, int], q: torch.Tensor):
    """(tensor, strides [B, H, Sq, Skv] with 0 on broadcast dims, kind) of the attn_mask."""
    if attn_mask is None:
        return q, (0, 0, 0, 0), _NO_MASK
    kind = _BOOL_MASK if attn_mask.dtype == torch.bool else _ADDITIVE_MASK
    mask = (attn_mask.view(torch.uint8) if kind == _BOOL_MASK else attn_mask).expand(shape)
    return mask, mask.stride(), kind


def sparse_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    selection: BlockSelection,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    *,
    window: int | None = None,
    softcap: float | None = None,
    launch: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sparse attention over exactly ``selection``'s blocks.

    Args:
        grad_out: dO [B, H, Sq, D], dtype of q.
        q: [B, H, Sq, D]; k, v: [B, Hkv, Skv, D]; float16, bfloat16 or float32 (H % Hkv == 0).
        out: the forward's output [B, H, Sq, D].
        lse: float32 [B, H, Sq], the forward's natural-log log-sum-exp of the scaled scores (+bias);
            -inf on fully masked rows (their gradients are 0).
        selection: the forward's `BlockSelection` (block size b, nq x nk blocks).
        attn_mask: None, bool (True = keep) or additive float, broadcastable to [B, H, Sq, Skv].
        is_causal: top-left aligned causal mask (query row r sees key c <= r).
        scale: score scale (None = 1 / sqrt(D)).
        window: the forward's causal sliding window (``masks``): row r sees keys (r - window, r].
        softcap: the forward's logit soft-cap (`softcap` module), None: no cap.
        launch: tile shapes and chunking (benchmarks); None = `launch.default_backward_launch(D)`.

    Returns:
        dq [B, H, Sq, D] like q; dk, dv [B, Hkv, Skv, D] like k, v (GQA heads summed).
    """
    reason = supported(q, k, v, attn_mask)
    if reason is not None:
        raise ValueError(f"triton sparse_attention_backward: {reason}")
    check_window(window, is_causal, attn_mask)
    check_softcap(softcap)
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    block = selection.block_size
    nq, nk = triton.cdiv(q_len, block), triton.cdiv(kv_len, block)
    expected = (batch, heads, nq, nk)
    if (selection.q_len, selection.kv_len) != (q_len, kv_len) or selection.kv_indices.shape != expected:
        raise ValueError(
            f"triton sparse_attention_backward: selection for Sq={selection.q_len}, Skv={selection.kv_len}, "
            f"indices {tuple(selection.kv_indices.shape)} does not fit q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    cfg = launch or default_backward_launch(head_dim)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    group = heads // kv_heads
    mask, mask_strides, mask_kind = _mask_operand(attn_mask, (batch, heads, q_len, kv_len), q)
    # (base-2 cap, window, additive floor) scalars of both kernels; the cap is read only when SOFTCAP;
    # no window = one wider than any distance.
    band = (
        (softcap or 1.0) * LOG2E,
        q_len + kv_len if window is None else window,
        masked_floor(mask.dtype) if mask_kind == _ADDITIVE_MASK else 0.0,
    )
    shared = {
        "GROUP": group,
        "BLOCK": block,
        "HEAD_DIM": head_dim,
        "HEAD_DIM_PAD": head_dim_pad(head_dim),
        "IS_CAUSAL": is_causal,
        "MASK_KIND": mask_kind,
        "SOFTCAP": softcap is not None,
        "FP32_DOT": needs_fp32_dot(q.dtype),
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }

    delta = torch.empty((batch, heads, q_len), dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    pre_m = min(64, block)
    _preprocess[(triton.cdiv(q_len, pre_m), batch * heads)](
        out,
        grad_out,
        lse,
        delta,
        lse2,
        *out.stride(),
        *grad_out.stride(),
        *lse.stride(),
        heads,
        q_len,
        BLOCK_M=pre_m,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=shared["HEAD_DIM_PAD"],
    )

    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dq_m = min(cfg.dq_block_m, block)
    dq_tiles = triton.cdiv(q_len, dq_m)
    dq_kernel[(batch * heads * dq_tiles,)](
        q,
        k,
        v,
        grad_out,
        dq,
        mask,
        lse2,
        delta,
        selection.kv_num_blocks,
        selection.kv_indices,
        q.stride(),
        k.stride(),
        v.stride(),
        grad_out.stride(),
        dq.stride(),
        mask_strides,
        selection.kv_num_blocks.stride(),
        selection.kv_indices.stride(),
        kv_heads,
        q_len,
        kv_len,
        dq_tiles,
        scale,
        scale * LOG2E,
        *band,
        BLOCK_M=dq_m,
        BLOCK_N=min(cfg.dq_block_n, block),
        **shared,
    )

    q_num_blocks, q_indices = transpose_selection(selection)
    longest = nq * group  # the most entries a key block's list can have
    chunk = min(cfg.dkdv_chunk or longest, longest)
    chunks = triton.cdiv(longest, chunk)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    # Scratch for chunked lists (never touched when no list can need more than one chunk).
    scratch_shape = k.shape if chunks > 1 else (1,)
    dk32 = torch.zeros(scratch_shape, dtype=torch.float32, device=k.device)
    dv32 = torch.zeros(scratch_shape, dtype=torch.float32, device=k.device)
    dkdv_n = min(cfg.dkdv_block_n, block)
    kv_tiles = triton.cdiv(kv_len, dkdv_n)
    dkdv_kernel[(batch * kv_heads * kv_tiles * chunks,)](
        q,
        k,
        v,
        grad_out,
        dk,
        dv,
        dk32,
        dv32,
        mask,
        lse2,
        delta,
        q_num_blocks,
        q_indices,
        q.stride(),
        k.stride(),
        v.stride(),
        grad_out.stride(),
        mask_strides,
        q_num_blocks.stride(),
        q_indices.stride(),
        kv_heads,
        batch * kv_heads,
        q_len,
        kv_len,
        kv_tiles,
        chunk,
        scale,
        scale * LOG2E,
        *band,
        BLOCK_M=min(cfg.dkdv_block_m, block),
        BLOCK_N=dkdv_n,
        **shared,
    )
    if chunks > 1:
        _dkdv_finalize[(batch * kv_heads * kv_tiles,)](
            dk,
            dv,
            dk32,
            dv32,
            q_num_blocks,
            q_num_blocks.stride(),
            kv_heads,
            batch * kv_heads,
            kv_len,
            chunk,
            GROUP=group,
            BLOCK=block,
            BLOCK_N=dkdv_n,
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=shared["HEAD_DIM_PAD"],
        )
    return dq, dk, dv
