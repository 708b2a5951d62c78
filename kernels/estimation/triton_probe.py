"""Fused Triton row probe: `probe_block_mass`, as `reference.probe_block_mass` for attn_mask=None
(same arguments, and a `launch.LaunchConfig`), and its mix into Ahat.

The probe rows are query block i's last real row, r_i = min((i + 1) * b, Sq) - 1. Each row's keys
are cut into splits of ``split_n`` keys so that a row's work spreads over many programs (one
program per (batch, query head, tile of ``BLOCK_R`` probe rows, key split)); a program walks its
split in steps of ``BLOCK_N`` keys. One kernel, `probe_kernel`, launched twice:

1. ``MASS=False`` (scores each allowed key once): the base-2 log-sum-exp of every (row, key block)
   over its allowed keys (causal c <= r_i, window r_i - window < c, c < Skv; -inf for a block the
   row cannot see) into ``LSE`` [B, H, nq, nk] (the output itself, or a scratch when mixing), and
   the split's online-softmax statistics of those block sums (max and sum) per (row, split)
   [B, H, nq, n_splits];
2. ``MASS=True`` (no scores: loads, exp2 and stores): each program merges its rows' split statistics
   into the row's log-sum-exp and stores each block's probability exp2(lse_b - lse_row) into the
   [B, H, nq, nk] output; with ``MIX`` it stores ``(ahat + mass) / 2`` for rows that see a key and
   ``ahat`` elsewhere (`reference.with_row_probe`).

Before 2026-12-07 the second launch re-scored every key with the merged statistics (the two
launches cost two QK^T passes over the probe rows); the block log-sum-exps make the second one a
memory pass.

Splitting the keys keeps every program's loop short: one program per row tile over all 32K keys
was a 1024-step serial chain (0.85 ms a layer at 32K on an H100, 2026-12-06, nearly as long as the
sparse attention it serves). Key tiles a row tile never sees (past its last row when causal; before
its first row's window) are stored as zero mass without being scored, so the output needs no
memset. A logit soft-cap (``softcap``) caps the scores before the causal and window masks
(``SOFTCAP``, a constexpr: without it the kernel is unchanged). Operands are the inputs' dtype
(bf16/fp16 tensor cores, fp32 accumulation); fp32 inputs use exact fp32 dots (interpreter). Head dims
up to 256 (non-powers of two padded with masked loads).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..masks import check_window
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

# Split statistics per row tile at most (rows x splits): the mass kernel holds them in registers;
# 64 rows x 64 splits take 96-178 registers at D 64-256 without spills (sm_90, scripts/sm90_resources.py).
MAX_SPLIT_STATS = 4096


def supported(q: Tensor, k: Tensor, attn_mask: Tensor | None) -> str | None:
    """None when `probe_block_mass` can run these inputs, else the reason it cannot."""
    if attn_mask is not None:
        return "attn_mask: the fused probe takes causal, windowed or unmasked attention only"
    return qk_reason(q, k)


@torch.no_grad()
def probe_block_mass(
    q: Tensor,
    k: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float,
    block_size: int,
    *,
    window: int | None = None,
    softcap: float | None = None,
    ahat: Tensor | None = None,
    launch: LaunchConfig | None = None,
) -> Tensor:
    """float32 [B, H, nq, nk]: exact attention mass on each key block of query block i's last real
    row, as `reference.probe_block_mass`; or, given ``ahat``, the mix of `reference.with_row_probe`
    written into ``ahat`` itself (and returned).

    q: [B, H, Sq, D], k: [B, Hkv, Skv, D] (GQA: head h reads h // (H // Hkv)), one of bf16 / fp16 /
    fp32 (fp32 under the interpreter only, see `supported`); attn_mask: must be None (the reference's
    argument, taken so that both take the same ones); ``block_size``: a power of two >= 16;
    ``window``: causal sliding window (``masks``); ``softcap``: logit soft-cap (`softcap` module);
    ``ahat``: float32 [B, H, nq, nk], contiguous.
    ``launch`` overrides the tiles; None = `launch.default_launch`.
    """
    reason = supported(q, k, attn_mask)
    if reason is not None:
        raise ValueError(f"triton probe_block_mass: {reason}")
    check_window(window, is_causal, None)
    check_softcap(softcap)
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"triton probe_block_mass: block size {block_size} is not a power of two >= 16")
    cfg = launch or default_launch(q.shape[-1], window is not None)
    block_n = max(cfg.block_n, block_size)
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    nq, nk = triton.cdiv(q_len, block_size), triton.cdiv(kv_len, block_size)
    if ahat is not None and (ahat.shape != (batch, heads, nq, nk) or not ahat.is_contiguous()):
        raise ValueError(
            f"triton probe_block_mass: ahat {tuple(ahat.shape)} is not a contiguous {(batch, heads, nq, nk)}"
        )
    key_tiles = triton.cdiv(nk * block_size, block_n)
    max_splits = max(1, MAX_SPLIT_STATS // cfg.block_r)
    tiles_per_split = max(triton.cdiv(cfg.split_n, block_n), triton.cdiv(key_tiles, max_splits))
    splits = triton.cdiv(key_tiles, tiles_per_split)
    r_tiles = triton.cdiv(nq, cfg.block_r)
    stats = torch.empty(2, batch, heads, nq, splits, dtype=torch.float32, device=q.device)
    out = torch.empty(batch, heads, nq, nk, dtype=torch.float32, device=q.device) if ahat is None else ahat
    block_lse = out if ahat is None else torch.empty_like(out)  # ahat is read by the mix: a scratch
    grid = (batch * heads * r_tiles, splits)
    common = dict(
        GQA=heads // kv_heads,
        BLOCK_SIZE=block_size,
        BLOCK_R=cfg.block_r,
        BLOCK_N=block_n,
        **score_constexprs(q, is_causal, window, softcap),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    cap = (softcap or 1.0) * LOG2E  # base 2; read only when SOFTCAP
    # Flat scalars (no tuples): Inductor compiles a traced launch's arguments one by one.
    rows = (q, k, *q.stride(), *k.stride(), heads, q_len, kv_len, nq, r_tiles, scale * LOG2E, cap)
    # window: read only when WINDOWED
    split_args = (0 if window is None else window, splits, tiles_per_split)
    # The block log-sum-exps and the statistics of every split, then the masses (they need every
    # split's statistics).
    for mass in (False, True):
        run_kernel(
            probe_kernel,
            grid,
            *rows,
            *split_args,
            stats,
            stats.stride(0),
            block_lse,
            out,
            nk,
            SPLITS_PAD=triton.next_power_of_2(splits),
            MIX=ahat is not None,
            MASS=mass,
            **common,
        )
    return out


@triton.jit
def _scores(
    q_rows,
    k_base,
    n0,
    rows,
    stride_kn,
    kv_len,
    qk_scale,
    softcap,
    window,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    SOFTCAP: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """[BLOCK_R, BLOCK_N] base-2 scores log2e * scale * q[r] . k[c] of keys [n0, n0 + BLOCK_N)
    (SOFTCAP: capped at the base-2 ``softcap``); -inf where key c is not allowed for row r."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    kt = tl.load(
        k_base + offs_n[:, None] * stride_kn,
        mask=(offs_n[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    s = tile_dot(q_rows, tl.trans(kt), None, FP32_DOT) * qk_scale
    if SOFTCAP:
        s, _ = soft_cap(s, softcap)
    keep = offs_n[None, :] < kv_len
    if IS_CAUSAL:
        keep = keep & (offs_n[None, :] <= rows[:, None])
    if WINDOWED:
        keep = keep & (offs_n[None, :] > rows[:, None] - window)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _program_tile(heads, nq, r_tiles, BLOCK_R: tl.constexpr):
    """This program's (batch, head, row tile), its query blocks ``offs_i`` and their row index in a
    [B, H, nq] layout. Program order, fastest first: head (heads of a KV group share key tiles in L2),
    row tile (last first: causal tiles near the end are the longest), batch; then the key split.
    No pointers: the stores' addresses derive from it, and torch's mutation analysis of a traced launch
    takes every argument of a called function as reaching its results."""
    pid = tl.program_id(0)
    head = (pid % heads).to(tl.int64)
    rest = pid // heads
    tile = r_tiles - 1 - rest % r_tiles
    batch = (rest // r_tiles).to(tl.int64)
    offs_i = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    return batch, head, tile, offs_i, (batch * heads + head) * nq + offs_i


@triton.jit
def _probe_span(
    sizes,
    tile,
    offs_i,
    window,
    tiles_per_split,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
):
    """The probe rows of row ``tile`` (query blocks ``offs_i``; `_program_tile`): which are real
    (``row_ok``), their row index ``rows``, this program's split of key tiles [split_first,
    split_first + tiles_per_split) and the part [lo, hi) of it the rows may see.
    ``sizes``: (heads, q_len, kv_len, nq, r_tiles)."""
    heads, q_len, kv_len, nq, r_tiles = sizes
    row_ok = offs_i < nq
    rows = tl.minimum((offs_i + 1) * BLOCK_SIZE, q_len) - 1  # rows past nq clamp to the last row

    # Key tiles the row tile sees: [first, visited). Causal: up to its last row; window: from the
    # tile of the first key its first row sees (numerators kept >= 0 for integer division).
    key_stop = kv_len
    first = 0
    if IS_CAUSAL:
        last_row = tl.minimum((tile * BLOCK_R + BLOCK_R) * BLOCK_SIZE, q_len) - 1
        key_stop = tl.minimum(key_stop, last_row + 1)
    visited = tl.cdiv(key_stop, BLOCK_N)
    if WINDOWED:
        first_row = tl.minimum((tile * BLOCK_R + 1) * BLOCK_SIZE, q_len) - 1
        first = tl.minimum(tl.maximum(first_row - window + 1, 0) // BLOCK_N, visited)
    split_first = tl.program_id(1) * tiles_per_split
    lo = tl.maximum(first, split_first)
    hi = tl.minimum(visited, split_first + tiles_per_split)
    return row_ok, rows, split_first, lo, hi


@triton.jit
def _probe_operands(
    Q,
    K,
    q_strides,
    k_strides,
    batch,
    head,
    rows,
    row_ok,
    GQA: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    """q [BLOCK_R, HEAD_DIM_PAD] of the probe ``rows`` of (batch, head) and the key head's base pointer."""
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q_base = Q + batch * q_strides[0] + head * q_strides[1]
    q_rows = tl.load(
        q_base + rows[:, None] * q_strides[2] + offs_d[None, :] * q_strides[3],
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    k_base = K + batch * k_strides[0] + (head // GQA) * k_strides[1] + offs_d[None, :] * k_strides[3]
    return q_rows, k_base


@triton.jit
def probe_kernel(
    Q,
    K,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    heads,
    q_len,
    kv_len,
    nq,
    r_tiles,
    qk_scale,
    softcap,
    window,
    splits,
    tiles_per_split,
    STATS,
    stats_plane,
    LSE,
    OUT,
    nk,
    GQA: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    SOFTCAP: tl.constexpr,
    FP32_DOT: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    MIX: tl.constexpr,
    MASS: tl.constexpr,
):
    """One pass over this program's key split (module docstring): MASS=False the block log-sum-exps
    into LSE [B, H, nq, nk] and the split's statistics into STATS [2, B, H, nq, splits] (the max,
    then the sum); MASS=True the rows' block masses from LSE into OUT [B, H, nq, nk] (mixed into it
    with MIX; LSE may be OUT)."""
    BLOCKS_J: tl.constexpr = BLOCK_N // BLOCK_SIZE
    qk_scale, softcap = as_fp32(qk_scale), as_fp32(softcap)
    sizes = (heads, q_len, kv_len, nq, r_tiles)
    batch, head, tile, offs_i, row_index = _program_tile(heads, nq, r_tiles, BLOCK_R)
    row_ok, rows, split_first, lo, hi = _probe_span(
        sizes, tile, offs_i, window, tiles_per_split, BLOCK_SIZE, BLOCK_R, BLOCK_N, IS_CAUSAL, WINDOWED
    )
    row_offset = row_index[:, None].to(tl.int64) * nk
    if MASS:
        # The rows' log-sum-exp over every split (a split that saw nothing holds -inf, 0).
        offs_s = tl.arange(0, SPLITS_PAD)
        stat = STATS + row_index[:, None] * splits + offs_s[None, :]
        stat_ok = row_ok[:, None] & (offs_s[None, :] < splits)
        m_s = tl.load(stat, mask=stat_ok, other=float("-inf"))
        l_s = tl.load(stat + stats_plane, mask=stat_ok, other=0.0)
        m_i = tl.max(m_s, 1)
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        l_i = tl.sum(l_s * tl.math.exp2(m_s - m_safe[:, None]), 1)
        m_shift, inv_l = normaliser(m_i, l_i)  # rows that see no key get zeros
        seen = l_i > 0.0
        for t in tl.range(split_first, split_first + tiles_per_split):
            offs_j = t * BLOCKS_J + tl.arange(0, BLOCKS_J)
            ok = row_ok[:, None] & (offs_j[None, :] < nk)
            if (t >= lo) & (t < hi):
                lse_b = tl.load(LSE + row_offset + offs_j[None, :], mask=ok, other=float("-inf"))
                mass = tl.math.exp2(lse_b - m_shift[:, None]) * inv_l[:, None]
            else:
                mass = tl.zeros([BLOCK_R, BLOCKS_J], dtype=tl.float32)
            ptrs = OUT + row_offset + offs_j[None, :]
            if MIX:
                ahat = tl.load(ptrs, mask=ok, other=0.0)
                mass = tl.where(seen[:, None], (ahat + mass) * 0.5, ahat)
            tl.store(ptrs, mass, mask=ok)
    else:
        q_strides = (stride_qb, stride_qh, stride_qm, stride_qd)
        k_strides = (stride_kb, stride_kh, stride_kn, stride_kd)
        q_rows, k_base = _probe_operands(
            Q, K, q_strides, k_strides, batch, head, rows, row_ok, GQA, HEAD_DIM, HEAD_DIM_PAD
        )
        m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
        for t in tl.range(lo, hi):
            s = _scores(
                q_rows, k_base, t * BLOCK_N, rows, stride_kn, kv_len, qk_scale, softcap, window,
                BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, IS_CAUSAL, WINDOWED, SOFTCAP, FP32_DOT,
            )  # fmt: skip
            s = tl.reshape(s, [BLOCK_R, BLOCKS_J, BLOCK_SIZE])
            m_b = tl.max(s, 2)
            l_b = tl.sum(tl.math.exp2(s - tl.where(m_b == float("-inf"), 0.0, m_b)[:, :, None]), 2)
            lse_b = tl.where(l_b > 0.0, m_b + tl.math.log2(tl.where(l_b > 0.0, l_b, 1.0)), float("-inf"))
            offs_j = t * BLOCKS_J + tl.arange(0, BLOCKS_J)
            tl.store(LSE + row_offset + offs_j[None, :], lse_b, mask=row_ok[:, None] & (offs_j[None, :] < nk))
            m_i, l_i = online_stats(m_i, l_i, lse_b)  # a block's lse stands for its keys' scores
        stat = STATS + row_index * splits + tl.program_id(1)
        tl.store(stat, m_i, mask=row_ok)
        tl.store(stat + stats_plane, l_i, mask=row_ok)
