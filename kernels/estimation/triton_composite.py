"""Fused Triton composite / pooled block estimator: `estimate_blocks`, as `reference.estimate_blocks`
for the ``composite`` and ``pooled`` estimators (same arguments and Ahat, and a `launch.LaunchConfig`).

Composite tokens are group means (`reference.composite_means`: torch ops, one read of q and k).
Then one program per (batch, query head, tile of ``BLOCK_U`` query composites = whole query blocks)
runs two passes over the key composites its rows may see (causal: up to the tile's last row):

1. online softmax statistics per query composite u: max and sum over w of
   2^(log2e * scale * qtilde_u . ktilde_w + log2 count(u, w));
2. the normalised probabilities, summed per key block (R = b / g key composites) and over the
   query block's R rows, divided by the number of rows that see a key, stored straight into Ahat.

count(u, w) is the number of unmasked (row, key) pairs of the g x g tile (reference docstring):
rows(u) * keys(w) below the diagonal, the triangle count on it, 0 above it or past the keys; with a
causal sliding ``window`` (row r sees keys (r - window, r]) the pairs inside the band, in closed
form (`_band_count`). Key tiles strictly below the diagonal, wholly inside the band and with full
key groups ("interior") skip that arithmetic. A logit soft-cap (``softcap``) caps the similarity
term before log2 count is added, as the reference does (``SOFTCAP``, a constexpr: without it the
kernel is unchanged). Key blocks a tile never visits (above the diagonal,
below the band) are written as zeros, so Ahat needs no memset. Only the [B, H, nq, nk] output is
written; no score matrix is materialised. Head dims up to 256 (non-powers of two padded).

Operands are the inputs' dtype (bf16/fp16 tensor cores, fp32 accumulation); fp32 inputs use
exact fp32 dots (interpreter). With a bf16 input the composite means are rounded to bf16 before
the dot, the only difference from the fp32 reference (H100, 8K tokens, structured input: Ahat
relative error 4e-3 to 5e-3; 96-99% of (b, h, i) select exactly the same blocks).

Cost, H100 (notes/prefill_kernel.md): the kernel is 0.13 ms at 32K and 1.8 ms at 128K tokens
(H = 32, D = 128), the means one read of q and k. The two passes do 4 * D flops per composite
pair, attention 4 * D per token pair on the selected blocks, so the estimate costs about
1 / (g^2 * density) of the attention's dot work (2x that in exponentials) at equal efficiency:
the 10% budget of METHOD.md is out of reach for g = 16 below ~4% density (dots alone; ~8% with
the exponentials).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..masks import check_window, resolve_scale
from ..softcap import check_softcap
from ..triton_utils import (
    LOG2E,
    as_fp32,
    normaliser,
    online_stats,
    qk_reason,
    run_kernel,
    score_constexprs,
    soft_cap,
    tile_dot,
)
from .launch import LaunchConfig, default_launch
from .params import EstimationParams
from .reference import composite_means, with_row_probe


def supported(q: Tensor, k: Tensor, attn_mask: Tensor | None, params: EstimationParams) -> str | None:
    """None when `estimate_blocks` can run these inputs, else the reason it cannot."""
    if params.estimator not in ("composite", "pooled"):
        return f"estimator {params.estimator!r}: the fused kernel computes 'composite' and 'pooled'"
    if attn_mask is not None:
        return "attn_mask: the fused estimator takes causal or unmasked attention only"
    return qk_reason(q, k)


def estimate_blocks(
    q: Tensor,
    k: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
    params: EstimationParams,
    *,
    window: int | None = None,
    softcap: float | None = None,
    launch: LaunchConfig | None = None,
) -> Tensor:
    """Ahat float32 [B, H, nq, nk] of ``params.estimator`` (composite or pooled), as the reference.

    q: [B, H, Sq, D], k: [B, Hkv, Skv, D] (GQA: head h reads h // (H // Hkv)), one of bf16 / fp16 /
    fp32 (fp32 under the interpreter only); attn_mask must be None (see `supported`); scale None =
    1 / sqrt(D); ``window``: causal sliding window (``masks``); ``softcap``: logit soft-cap (`softcap`
    module). ``launch`` overrides the tiles (benchmarks); None = `launch.default_launch`.
    """
    reason = supported(q, k, attn_mask, params)
    if reason is not None:
        raise ValueError(f"triton estimate_blocks: {reason}")
    check_window(window, is_causal, attn_mask)
    check_softcap(softcap)
    b = params.block_size
    group = params.granularity if params.estimator == "composite" else b
    per_block = b // group
    cfg = launch or default_launch(q.shape[-1], window is not None)
    block_u, block_w = max(cfg.block_u, per_block), max(cfg.block_w, per_block)
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    nq, nk = triton.cdiv(q_len, b), triton.cdiv(kv_len, b)

    scale = resolve_scale(scale, head_dim)
    q_means, k_means = composite_means(q, group), composite_means(k, group)
    ahat = torch.empty(batch, heads, nq, nk, dtype=torch.float32, device=q.device)
    u_tiles = triton.cdiv(nq * per_block, block_u)
    run_kernel(
        composite_kernel,
        (batch * heads * u_tiles,),
        q_means,
        k_means,
        ahat,
        *q_means.stride(),
        *k_means.stride(),
        *ahat.stride(),
        heads,
        q_len,
        kv_len,
        q_means.shape[2],
        k_means.shape[2],
        nq,
        nk,
        u_tiles,
        scale * LOG2E,
        (softcap or 1.0) * LOG2E,  # base 2; read only when SOFTCAP
        q_len + kv_len if window is None else window,
        GQA=heads // kv_heads,
        GROUP=group,
        PER_BLOCK=per_block,
        BLOCK_U=block_u,
        BLOCK_W=block_w,
        **score_constexprs(q, is_causal, window, softcap),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if params.row_probe:
        return with_row_probe(ahat, q, k, attn_mask, is_causal, scale, b, window=window, softcap=softcap)
    return ahat


@triton.jit
def _scores(
    qc,
    kc_base,
    w0,
    offs_u,
    offs_d,
    row_log2_count,
    rows_u,
    stride_kw,
    n_w,
    kv_len,
    qk_scale,
    softcap,
    window,
    GROUP: tl.constexpr,
    BLOCK_W: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    SOFTCAP: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BOUNDARY: tl.constexpr,
):
    """[BLOCK_U, BLOCK_W] base-2 scores log2e * scale * qtilde . ktilde (SOFTCAP: capped at the
    base-2 ``softcap``) + log2 count of key composites [w0, w0 + BLOCK_W); -inf where the count is 0."""
    offs_w = w0 + tl.arange(0, BLOCK_W)
    ptrs = kc_base + offs_w[:, None] * stride_kw
    if BOUNDARY:
        kc = tl.load(ptrs, mask=(offs_w[:, None] < n_w) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif HEAD_DIM == HEAD_DIM_PAD:
        kc = tl.load(ptrs)
    else:
        kc = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    s = tile_dot(qc, tl.trans(kc), None, FP32_DOT) * qk_scale
    if SOFTCAP:
        s, _ = soft_cap(s, softcap)
    if BOUNDARY:
        keys = tl.minimum(tl.maximum(kv_len - offs_w * GROUP, 0), GROUP)[None, :]
        rows = rows_u[:, None]
        if IS_CAUSAL:
            # Row t of group u sees the keys c of group w with c <= u*g + t, less (window) those
            # with c <= u*g + t - window.
            shift = (offs_u[:, None] - offs_w[None, :]) * GROUP + 1
            count = _band_count(shift, rows, keys)
            if WINDOWED:
                count -= _band_count(shift - window, rows, keys)
        else:
            count = rows * keys
        s = tl.where(count > 0, s + tl.math.log2(tl.maximum(count, 1).to(tl.float32)), float("-inf"))
    else:
        # Interior: every key group is full and strictly below the diagonal.
        s = s + row_log2_count[:, None]
    return s


@triton.jit
def _clamp_sum(n, keys):
    """sum over y in [0, n) of clamp(y, 0, keys), elementwise (0 for n <= 0)."""
    n = tl.maximum(n, 0)
    a = tl.minimum(n, keys + 1)
    return a * (a - 1) // 2 + tl.maximum(n - keys - 1, 0) * keys


@triton.jit
def _band_count(shift, rows, keys):
    """sum over t in [0, rows) of clamp(shift + t, 0, keys): the (row, key) pairs of a composite tile
    with key offset <= row offset + shift - 1."""
    return _clamp_sum(shift + rows, keys) - _clamp_sum(shift, keys)


@triton.jit
def _store_mass(
    s,
    m_shift,
    inv_l,
    inv_rows,
    a_base,
    row_ok,
    t,
    stride_aj,
    nk,
    BLOCK_U: tl.constexpr,
    PER_BLOCK: tl.constexpr,
    BLOCKS_I: tl.constexpr,
    BLOCKS_J: tl.constexpr,
):
    """Probabilities of key tile t, summed per key block and averaged per query block, into Ahat."""
    p = tl.math.exp2(s - m_shift[:, None]) * inv_l[:, None]
    per_key_block = tl.sum(tl.reshape(p, [BLOCK_U, BLOCKS_J, PER_BLOCK]), 2)
    mass = tl.sum(tl.reshape(per_key_block, [BLOCKS_I, PER_BLOCK, BLOCKS_J]), 1) * inv_rows[:, None]
    offs_j = t * BLOCKS_J + tl.arange(0, BLOCKS_J)
    tl.store(a_base + offs_j[None, :] * stride_aj, mass, mask=row_ok & (offs_j[None, :] < nk))


@triton.jit
def _run(
    m_i,
    l_i,
    m_shift,
    inv_l,
    inv_rows,
    qc,
    kc_base,
    a_base,
    row_ok,
    offs_u,
    offs_d,
    row_log2_count,
    rows_u,
    first,
    free0,
    free1,
    n_boundary,
    stride_kw,
    stride_aj,
    n_w,
    nk,
    kv_len,
    qk_scale,
    softcap,
    window,
    GROUP: tl.constexpr,
    PER_BLOCK: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_W: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    SOFTCAP: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BOUNDARY: tl.constexpr,
    STORE: tl.constexpr,
):
    """One pass over key tiles, BOUNDARY=False the interior [free0, free1), BOUNDARY=True the
    ``n_boundary`` others from ``first`` on, [first, free0) and [free1, first + n_boundary + free1 -
    free0): the online statistics (m_i, l_i), or with STORE the block masses into Ahat. Returns
    (m_i, l_i)."""
    # Tiles [start, stop); a tile t >= gap_at is read as t + gap (skipping the other pass's tiles).
    if BOUNDARY:
        start, stop, gap_at, gap = first, first + n_boundary, free0, free1 - free0
    else:
        start, stop, gap_at, gap = free0, free1, 0, 0
    for it in tl.range(start, stop):
        t = it + gap * (it >= gap_at)
        s = _scores(
            qc, kc_base, t * BLOCK_W, offs_u, offs_d, row_log2_count, rows_u, stride_kw, n_w, kv_len,
            qk_scale, softcap, window, GROUP, BLOCK_W, HEAD_DIM, HEAD_DIM_PAD, IS_CAUSAL, WINDOWED,
            SOFTCAP, FP32_DOT, BOUNDARY,
        )  # fmt: skip
        if STORE:
            _store_mass(
                s, m_shift, inv_l, inv_rows, a_base, row_ok, t, stride_aj, nk,
                BLOCK_U, PER_BLOCK, BLOCK_U // PER_BLOCK, BLOCK_W // PER_BLOCK,
            )  # fmt: skip
        else:
            m_i, l_i = online_stats(m_i, l_i, s)
    return m_i, l_i


@triton.jit
def _zero_blocks(a_base, row_ok, j_start, j_stop, BLOCKS_I: tl.constexpr, BLOCKS_J: tl.constexpr, stride_aj):
    """Ahat = 0 on key blocks [j_start, j_stop) of this tile's query blocks."""
    for j0 in tl.range(j_start, j_stop, BLOCKS_J):
        offs_j = j0 + tl.arange(0, BLOCKS_J)
        zeros = tl.zeros([BLOCKS_I, BLOCKS_J], dtype=tl.float32)
        tl.store(a_base + offs_j[None, :] * stride_aj, zeros, mask=row_ok & (offs_j[None, :] < j_stop))


@triton.jit
def composite_kernel(
    QC,
    KC,
    AHAT,
    stride_qb,
    stride_qh,
    stride_qu,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kw,
    stride_kd,
    stride_ab,
    stride_ah,
    stride_ai,
    stride_aj,
    heads,
    q_len,
    kv_len,
    n_u,
    n_w,
    nq,
    nk,
    u_tiles,
    qk_scale,
    softcap,
    window,
    GQA: tl.constexpr,
    GROUP: tl.constexpr,
    PER_BLOCK: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_W: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    SOFTCAP: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    # Program order, fastest first: head (heads of a KV group share key tiles in L2), query tile
    # (last first: causal tiles near the end are the longest), batch.
    BLOCKS_I: tl.constexpr = BLOCK_U // PER_BLOCK
    BLOCKS_J: tl.constexpr = BLOCK_W // PER_BLOCK
    qk_scale, softcap = as_fp32(qk_scale), as_fp32(softcap)
    pid = tl.program_id(0)
    head = (pid % heads).to(tl.int64)
    rest = pid // heads
    tile = u_tiles - 1 - rest % u_tiles
    batch = (rest // u_tiles).to(tl.int64)

    u0 = tile * BLOCK_U
    offs_u = u0 + tl.arange(0, BLOCK_U)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    qc = tl.load(
        QC + batch * stride_qb + head * stride_qh + offs_u[:, None] * stride_qu + offs_d[None, :] * stride_qd,
        mask=(offs_u[:, None] < n_u) & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    kc_base = KC + batch * stride_kb + (head // GQA) * stride_kh + offs_d[None, :] * stride_kd
    rows_u = tl.minimum(tl.maximum(q_len - offs_u * GROUP, 0), GROUP)
    row_log2_count = tl.where(
        rows_u > 0, tl.math.log2(tl.maximum(rows_u * GROUP, 1).to(tl.float32)), float("-inf")
    )

    # Key tiles visited: [first, visited) (causal: up to the diagonal; window: from the tile of the
    # first key the tile's first row sees). Interior (no count arithmetic): [free0, free1), every
    # key group full, below the diagonal and inside the band for every row; the rest is boundary.
    # Numerators are kept >= 0 so integer division agrees between the interpreter and the GPU.
    w_stop = n_w
    w_full = kv_len // GROUP
    first = 0
    free0 = 0
    if IS_CAUSAL:
        w_stop = tl.minimum(w_stop, u0 + BLOCK_U)
        w_full = tl.minimum(w_full, u0)
        # Without a window the wrapper passes window = Sq + Skv: first = 0, free0 = 0 (computed at
        # run time all the same: constant bounds here cost ~70 registers on sm_90).
        first = tl.maximum(u0 * GROUP - window + 1, 0) // (BLOCK_W * GROUP)
        last_row = (u0 + BLOCK_U) * GROUP - 1
        free0 = tl.where(last_row >= window, (last_row - window) // (BLOCK_W * GROUP) + 1, 0)
    visited = tl.cdiv(w_stop, BLOCK_W)
    free0 = tl.minimum(tl.maximum(free0, first), visited)
    free1 = tl.minimum(tl.maximum(w_full // BLOCK_W, free0), visited)
    n_boundary = (free0 - first) + (visited - free1)

    m_i = tl.full([BLOCK_U], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_U], dtype=tl.float32)
    offs_i = tile * BLOCKS_I + tl.arange(0, BLOCKS_I)
    a_base = AHAT + batch * stride_ab + head * stride_ah + offs_i[:, None] * stride_ai
    row_ok = offs_i[:, None] < nq
    for STORE in tl.static_range(2):
        if STORE == 1:
            # Rows that see no key (padding) get weight 0: shift by +inf, scale by 0.
            m_shift, inv_l = normaliser(m_i, l_i)
            seen = l_i > 0.0
            rows_seen = tl.sum(tl.reshape(seen.to(tl.float32), [BLOCKS_I, PER_BLOCK]), 1)
            inv_rows = 1.0 / tl.maximum(rows_seen, 1.0)
        else:
            m_shift, inv_l, inv_rows = m_i, l_i, tl.zeros([BLOCKS_I], dtype=tl.float32)
        for BOUNDARY in tl.static_range(2):
            m_i, l_i = _run(
                m_i, l_i, m_shift, inv_l, inv_rows, qc, kc_base, a_base, row_ok, offs_u, offs_d,
                row_log2_count, rows_u, first, free0, free1, n_boundary, stride_kw, stride_aj, n_w, nk,
                kv_len, qk_scale, softcap, window, GROUP, PER_BLOCK, BLOCK_U, BLOCK_W, HEAD_DIM, HEAD_DIM_PAD,
                IS_CAUSAL, WINDOWED, SOFTCAP, FP32_DOT, BOUNDARY == 1, STORE == 1,
            )  # fmt: skip
    _zero_blocks(a_base, row_ok, 0, tl.minimum(first * BLOCKS_J, nk), BLOCKS_I, BLOCKS_J, stride_aj)
    _zero_blocks(a_base, row_ok, visited * BLOCKS_J, nk, BLOCKS_I, BLOCKS_J, stride_aj)
