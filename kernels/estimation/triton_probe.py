"""Fused Triton row probe: `probe.probe_block_mass` for attn_mask=None in one kernel.

One program per (batch, query head, tile of ``BLOCK_R`` query blocks) scores the tile's probe rows
(query block i's last real row, r_i = min((i + 1) * b, Sq) - 1) against ``BLOCK_N`` keys per step,
in two passes over the key tiles the tile's rows may see:

1. online softmax statistics per probe row: base-2 max and sum over the allowed keys (causal
   c <= r_i, window r_i - window < c, c < Skv);
2. the normalised probabilities, summed per key block (``BLOCK_N`` is a multiple of b), stored
   straight into the [B, H, nq, nk] output.

Key tiles a tile never visits (past its last row when causal; before its first row's window) are
written as zeros, so the output needs no memset; rows that see no key get zeros. Only the output is
written: no score matrix is materialised. Operands are the inputs' dtype (bf16/fp16 tensor cores,
fp32 accumulation); fp32 inputs use exact fp32 dots (interpreter). Head dims up to 256 (non-powers
of two padded with masked loads).

sm_90 resources of the default `ProbeLaunch` (scripts/sm90_resources.py, bf16, causal): 64-96
registers at D <= 128 and 124-144 at D = 256 (with / without a window), no spills, 10-40 KB of
shared memory. Not yet timed on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..masks import check_window
from ..triton_utils import (
    LOG2E,
    head_dim_pad,
    needs_fp32_dot,
    normaliser,
    online_stats,
    qk_reason,
    tile_dot,
)


@dataclass(frozen=True)
class ProbeLaunch:
    """Tile shape and schedule of the probe kernel: ``block_r`` probe rows (query blocks) and
    ``block_n`` keys (raised to the block size where smaller) per step."""

    block_r: int = 16
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


def supported(q: Tensor, k: Tensor, attn_mask: Tensor | None) -> str | None:
    """None when `probe_block_mass_triton` can run these inputs, else the reason it cannot."""
    if attn_mask is not None:
        return "attn_mask: the fused probe takes causal, windowed or unmasked attention only"
    return qk_reason(q, k)


@torch.no_grad()
def probe_block_mass_triton(
    q: Tensor,
    k: Tensor,
    is_causal: bool,
    scale: float,
    block_size: int,
    *,
    window: int | None = None,
    launch: ProbeLaunch | None = None,
) -> Tensor:
    """float32 [B, H, nq, nk]: exact attention mass on each key block of query block i's last real
    row, as `probe.probe_block_mass` with attn_mask=None.

    q: [B, H, Sq, D], k: [B, Hkv, Skv, D] (GQA: head h reads h // (H // Hkv)), one of bf16 / fp16 /
    fp32 (fp32 under the interpreter only, see `supported`); ``block_size``: a power of two >= 16;
    ``window``: causal sliding window (``masks``). ``launch`` overrides the tiles; None = defaults.
    """
    reason = supported(q, k, None)
    if reason is not None:
        raise ValueError(f"triton probe_block_mass: {reason}")
    check_window(window, is_causal, None)
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"triton probe_block_mass: block size {block_size} is not a power of two >= 16")
    cfg = launch or ProbeLaunch()
    block_n = max(cfg.block_n, block_size)
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    nq, nk = triton.cdiv(q_len, block_size), triton.cdiv(kv_len, block_size)
    out = torch.empty(batch, heads, nq, nk, dtype=torch.float32, device=q.device)
    r_tiles = triton.cdiv(nq, cfg.block_r)
    _probe_kernel[(batch * heads * r_tiles,)](
        q,
        k,
        out,
        *q.stride(),
        *k.stride(),
        *out.stride(),
        heads,
        q_len,
        kv_len,
        nq,
        nk,
        r_tiles,
        scale * LOG2E,
        0 if window is None else window,  # read only when WINDOWED
        GQA=heads // kv_heads,
        BLOCK_SIZE=block_size,
        BLOCK_R=cfg.block_r,
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad(head_dim),
        IS_CAUSAL=is_causal,
        WINDOWED=window is not None,
        FP32_DOT=needs_fp32_dot(q.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
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
    window,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """[BLOCK_R, BLOCK_N] base-2 scores log2e * scale * q[r] . k[c] of keys [n0, n0 + BLOCK_N);
    -inf where key c is not allowed for row r."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    kt = tl.load(
        k_base + offs_n[:, None] * stride_kn,
        mask=(offs_n[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    s = tile_dot(q_rows, tl.trans(kt), None, FP32_DOT) * qk_scale
    keep = offs_n[None, :] < kv_len
    if IS_CAUSAL:
        keep = keep & (offs_n[None, :] <= rows[:, None])
    if WINDOWED:
        keep = keep & (offs_n[None, :] > rows[:, None] - window)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _probe_kernel(
    Q,
    K,
    MASS,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_mb,
    stride_mh,
    stride_mi,
    stride_mj,
    heads,
    q_len,
    kv_len,
    nq,
    nk,
    r_tiles,
    qk_scale,
    window,
    GQA: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    # Program order, fastest first: head (heads of a KV group share key tiles in L2), row tile
    # (last first: causal tiles near the end are the longest), batch.
    BLOCKS_J: tl.constexpr = BLOCK_N // BLOCK_SIZE
    pid = tl.program_id(0)
    head = (pid % heads).to(tl.int64)
    rest = pid // heads
    tile = r_tiles - 1 - rest % r_tiles
    batch = (rest // r_tiles).to(tl.int64)

    offs_i = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = offs_i < nq
    rows = tl.minimum((offs_i + 1) * BLOCK_SIZE, q_len) - 1  # rows past nq clamp to the last row
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q_rows = tl.load(
        Q + batch * stride_qb + head * stride_qh + rows[:, None] * stride_qs + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    k_base = K + batch * stride_kb + (head // GQA) * stride_kh + offs_d[None, :] * stride_kd

    # Key tiles visited: [first, visited). Causal: up to the tile's last row; window: from the tile
    # of the first key the tile's first row sees (numerators kept >= 0 for integer division).
    key_stop = kv_len
    first = 0
    if IS_CAUSAL:
        last_row = tl.minimum((tile * BLOCK_R + BLOCK_R) * BLOCK_SIZE, q_len) - 1
        key_stop = tl.minimum(key_stop, last_row + 1)
    visited = tl.cdiv(key_stop, BLOCK_N)
    if WINDOWED:
        first_row = tl.minimum((tile * BLOCK_R + 1) * BLOCK_SIZE, q_len) - 1
        first = tl.minimum(tl.maximum(first_row - window + 1, 0) // BLOCK_N, visited)

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    for t in tl.range(first, visited):
        s = _scores(
            q_rows,
            k_base,
            t * BLOCK_N,
            rows,
            stride_kn,
            kv_len,
            qk_scale,
            window,
            BLOCK_N,
            HEAD_DIM,
            HEAD_DIM_PAD,
            IS_CAUSAL,
            WINDOWED,
            FP32_DOT,
        )
        m_i, l_i = online_stats(m_i, l_i, s)

    m_shift, inv_l = normaliser(m_i, l_i)  # rows that see no key get zeros
    mass_base = MASS + batch * stride_mb + head * stride_mh + offs_i[:, None] * stride_mi
    for t in tl.range(first, visited):
        s = _scores(
            q_rows,
            k_base,
            t * BLOCK_N,
            rows,
            stride_kn,
            kv_len,
            qk_scale,
            window,
            BLOCK_N,
            HEAD_DIM,
            HEAD_DIM_PAD,
            IS_CAUSAL,
            WINDOWED,
            FP32_DOT,
        )
        p = tl.math.exp2(s - m_shift[:, None]) * inv_l[:, None]
        mass = tl.sum(tl.reshape(p, [BLOCK_R, BLOCKS_J, BLOCK_SIZE]), 2)
        offs_j = t * BLOCKS_J + tl.arange(0, BLOCKS_J)
        tl.store(mass_base + offs_j[None, :] * stride_mj, mass, mask=row_ok[:, None] & (offs_j[None, :] < nk))

    # Key blocks outside [first, visited) tiles: zeros.
    zeros = tl.zeros([BLOCK_R, BLOCKS_J], dtype=tl.float32)
    for t in tl.range(0, first):
        offs_j = t * BLOCKS_J + tl.arange(0, BLOCKS_J)
        tl.store(
            mass_base + offs_j[None, :] * stride_mj, zeros, mask=row_ok[:, None] & (offs_j[None, :] < nk)
        )
    for j0 in tl.range(visited * BLOCKS_J, nk, BLOCKS_J):
        offs_j = j0 + tl.arange(0, BLOCKS_J)
        tl.store(
            mass_base + offs_j[None, :] * stride_mj, zeros, mask=row_ok[:, None] & (offs_j[None, :] < nk)
        )
