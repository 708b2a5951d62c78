"""Fused Triton KV selection: `reference.select_blocks` in two row kernels, the same `BlockSelection`.

One program per (b, h, i) row of Ahat holds the row (nk padded to a power of two) in registers:

1. `_need_kernel` loads the row and the allowed row (at its broadcast strides), forms F(i) from the
   block indices (`forced_pattern`'s formula), the local mass, lazy, the available count and the
   need k_h; it writes need, lazy and the forced and available counts ([B, H, nq] each).
2. `_take_kernel`, one program per (b, h), turns those [B, H, nq] counts into take and the final
   lazy (`reference.take_counts`: the budget shared by the scope's heads, the clamp, the final query
   blocks and a head denser than ``dense_fallback_density`` in full), in chunks of query blocks.
3. `_select_kernel` reloads the row, finds the take-th largest available value, takes the ties at
   it by lower index first (the stable sort's order), and writes ``kv_indices`` (each selected block
   scattered to its cumulative-count slot, then the padding) and ``kv_num_blocks``.

No sort: both kernels search the bits of the float32 values instead (31-32 masked reductions over
the row). For values >= 0 the float bits, read as int32, order like the values, so

- need: the mass S(P) of the available blocks with bits >= P is non-increasing in P, and the k_h-th
  largest value v is the one whose bits are the largest P with S(P) >= target (found bit by bit
  from bit 30); then k_h = #(> v) + ceil((target - S(> v)) / v), at most the ties at v;
- take: the take-th largest key is the largest P with #(key >= P) >= take (integer counts, exact;
  the key maps any float order-preservingly to int32, -0.0 to +0.0).

Exactness: the selected set, lazy and budget equal `reference.select_blocks`' for any input on which both
compute the same need. The masses are float32 tree sums here and a sequential cumsum (CPU) or scan
(CUDA) there; they agree to float32 rounding (~1e-6 at nk = 2048, inside ``MASS_SLACK``), so need
can differ only where a cumulative mass lies within that rounding of tau + slack. Ties follow the
reference exactly. Ahat is taken as finite and >= -1 (an estimate is >= 0; the reference ranks
unavailable blocks at -1).

Launches per call: these three kernels and six allocations (no small torch ops: they cost more host
time than the kernels do GPU time at 8K-32K). Traffic per call: Ahat read twice (the allowed row
comes from L2 when it is shared by heads), the int32 ``kv_indices`` written once, nothing else at
[B, H, nq, nk]; no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_utils import interpreting, run_kernel
from .block_selection import BlockSelection
from .params import SelectionCall, SelectionParams
from .reference import MASS_SLACK, check_estimate

# Widest row one program holds: 8192 key blocks (512K tokens at b = 64), 16 warps x 16 values per thread.
MAX_KV_BLOCKS = 8192
# Query blocks `_take_kernel` holds at a time.
_TAKE_CHUNK = 1024
_INT_MIN = tl.constexpr(-(2**31))


def supported(ahat: Tensor, allowed: Tensor) -> str | None:
    """None when `select_blocks` can run these inputs, else the reason it cannot."""
    if ahat.device.type != "cuda" and not interpreting():
        return f"device {ahat.device.type} needs CUDA (or TRITON_INTERPRET=1)"
    if ahat.dtype != torch.float32 or ahat.dim() != 4:
        return f"ahat {ahat.dtype} with {ahat.dim()} dims: needs float32 [B, H, nq, nk]"
    if allowed.dtype != torch.bool or allowed.device != ahat.device:
        return f"allowed {allowed.dtype} on {allowed.device}: needs bool on {ahat.device}"
    try:
        shape = torch.broadcast_shapes(allowed.shape, ahat.shape)
    except RuntimeError:
        shape = None
    if shape != ahat.shape:
        return f"allowed {tuple(allowed.shape)} does not broadcast to ahat {tuple(ahat.shape)}"
    if ahat.numel() == 0:
        return f"empty estimate {tuple(ahat.shape)}"
    if ahat.shape[3] > MAX_KV_BLOCKS:
        return f"{ahat.shape[3]} key blocks: one program holds at most {MAX_KV_BLOCKS}"
    return None


def select_blocks(
    ahat: Tensor,
    allowed: Tensor,
    params: SelectionParams,
    call: SelectionCall,
    *,
    num_warps: int | None = None,
) -> BlockSelection:
    """`reference.select_blocks` in Triton: same arguments, rule and `BlockSelection` (module docstring).

    Args:
        ahat: float32 [B, H, nq, nk], the block estimate (any strides).
        allowed: bool, broadcastable to [B, H, nq, nk] (read at stride 0 along broadcast dims).
        params, call: as `reference.select_blocks`.
        num_warps: warps of the two row kernels; None = `_row_warps` (a launch sweep's override).

    Returns:
        kv_num_blocks, budget int32 [B, H, nq]; kv_indices int32 [B, H, nq, nk] (padded with nk);
        lazy bool [B, H, nq].
    """
    reason = supported(ahat, allowed)
    if reason is not None:
        raise ValueError(f"triton select_blocks: {reason}")
    check_estimate(ahat, params.block_size, call)
    num_kv_heads, is_causal, q_len, kv_len = call
    batch, heads, nq, nk = ahat.shape
    rows = batch * heads * nq
    block_n = triton.next_power_of_2(nk)
    num_warps = _row_warps(block_n) if num_warps is None else num_warps
    # Flat scalars (no tuples): Inductor compiles a traced launch's arguments one by one.
    allowed_strides = _broadcast_strides(allowed, ahat.shape)
    row_args = (*ahat.stride(), *allowed_strides, heads, nq, nk, params.n_sink, params.n_local)

    need = torch.empty(batch, heads, nq, dtype=torch.int32, device=ahat.device)
    lazy = torch.empty(batch, heads, nq, dtype=torch.bool, device=ahat.device)
    num_forced = torch.empty_like(need)
    num_available = torch.empty_like(need)
    run_kernel(
        _need_kernel,
        (rows,),
        ahat,
        allowed,
        need,
        lazy,
        num_forced,
        num_available,
        *row_args,
        params.tau + MASS_SLACK,
        params.lazy_threshold,
        IS_CAUSAL=is_causal,
        QUERY_SELECTION=params.query_selection,
        TAKE_ALL=params.tau >= 1.0,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    take = torch.empty_like(need)
    final_lazy = torch.empty_like(lazy)
    run_kernel(
        _take_kernel,
        (batch * heads,),
        need,
        lazy,
        num_forced,
        num_available,
        take,
        final_lazy,
        nq,
        {"head": 1, "kv_group": heads // num_kv_heads, "heads": heads}[params.budget_scope],
        params.min_blocks,
        nk if params.max_blocks is None else params.max_blocks,
        params.dense_last_blocks,
        params.dense_fallback_density,
        DENSE_HEADS=params.dense_fallback_density < 1.0,
        CHUNK=min(triton.next_power_of_2(nq), _TAKE_CHUNK),
    )
    lazy = final_lazy

    kv_indices = torch.empty(batch, heads, nq, nk, dtype=torch.int32, device=ahat.device)
    kv_num_blocks = torch.empty_like(need)
    run_kernel(
        _select_kernel,
        (rows,),
        ahat,
        allowed,
        take,
        kv_indices,
        kv_num_blocks,
        *row_args,
        IS_CAUSAL=is_causal,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return BlockSelection(
        kv_num_blocks=kv_num_blocks,
        kv_indices=kv_indices,
        lazy=lazy,
        budget=take,
        block_size=params.block_size,
        q_len=q_len,
        kv_len=kv_len,
    )


def _row_warps(block_n: int) -> int:
    """Default warps of the row kernels for a row of ``block_n`` (a power of two) values: 16 values
    per thread, 1 to 16 warps."""
    return min(16, max(1, block_n // 512))


def _broadcast_strides(t: Tensor, shape: torch.Size) -> tuple[int, ...]:
    """The strides of ``t`` broadcast to ``shape`` (0 along broadcast dims), without an expanded view:
    functionalisation (a traced launch) cannot write back through one, and torch's mutation analysis
    takes `_select_kernel` to write ``allowed`` (its scatter addresses derive from the loaded row)."""
    strides = (0,) * (len(shape) - t.dim()) + t.stride()
    sizes = (1,) * (len(shape) - t.dim()) + tuple(t.shape)
    return tuple(0 if size == 1 else stride for size, stride in zip(sizes, strides))


@triton.jit
def _row_ptrs(base, strides, batch, head, i, offs):
    """Pointers to entries ``offs`` of row (batch, head, i) of a [B, H, nq, nk] tensor of ``strides``."""
    return base + batch * strides[0] + head * strides[1] + i.to(tl.int64) * strides[2] + offs * strides[3]


@triton.jit
def _load_row(
    AHAT, ALLOWED, row, stride_ab, stride_ah, stride_ai, stride_aj,
    stride_lb, stride_lh, stride_li, stride_lj, heads, nq, nk, n_sink, n_local,
    IS_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """[BLOCK_N] block index, Ahat (0 past nk), forced (allowed & F pattern) and available (allowed &
    not F pattern) of the (b, h, i) row ``row`` (the program id, read by the kernels themselves: torch's
    mutation analysis of a traced launch takes every argument of a called function as reaching its
    results, and the stores' addresses derive from the row), from the kernels' shared arguments:
    Ahat's strides, allowed's strides, heads, nq, nk, n_sink, n_local."""
    ahat_strides = (stride_ab, stride_ah, stride_ai, stride_aj)
    allowed_strides = (stride_lb, stride_lh, stride_li, stride_lj)
    i = row % nq
    head = ((row // nq) % heads).to(tl.int64)
    batch = (row // (nq * heads)).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    in_row = offs < nk
    value = tl.load(_row_ptrs(AHAT, ahat_strides, batch, head, i, offs), mask=in_row, other=0.0)
    allowed = tl.load(_row_ptrs(ALLOWED, allowed_strides, batch, head, i, offs), mask=in_row, other=0) != 0
    # forced_pattern: sinks 0 .. n_sink-1 and n_local blocks ending at i (causal) or centred on i.
    if IS_CAUSAL:
        first = i - n_local + 1
    else:
        first = i - n_local // 2
    pattern = (offs < n_sink) | ((offs >= first) & (offs < first + n_local))
    return offs, value, allowed & pattern, allowed & ~pattern


@triton.jit
def _need_kernel(
    AHAT,
    ALLOWED,
    NEED,
    LAZY,
    NUM_FORCED,
    NUM_AVAILABLE,
    stride_ab,
    stride_ah,
    stride_ai,
    stride_aj,
    stride_lb,
    stride_lh,
    stride_li,
    stride_lj,
    heads,
    nq,
    nk,
    n_sink,
    n_local,
    mass_target,
    lazy_threshold,
    IS_CAUSAL: tl.constexpr,
    QUERY_SELECTION: tl.constexpr,
    TAKE_ALL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    _, value, forced, available = _load_row(
        AHAT, ALLOWED, row, stride_ab, stride_ah, stride_ai, stride_aj,
        stride_lb, stride_lh, stride_li, stride_lj, heads, nq, nk, n_sink, n_local, IS_CAUSAL, BLOCK_N,
    )  # fmt: skip
    local = tl.sum(tl.where(forced, value, 0.0))
    lazy = (local >= lazy_threshold) & QUERY_SELECTION
    num_available = tl.sum(available.to(tl.int32))
    if TAKE_ALL:
        need = num_available
    else:
        target = mass_target - local
        mass = tl.where(available, tl.maximum(value, 0.0), 0.0)
        # Bits of a value >= 0 order like the value; unavailable and negative entries (no mass) rank below.
        key = tl.where(available, value.to(tl.int32, bitcast=True), -1)
        kth = 0
        for b in tl.static_range(31):
            candidate = kth | (1 << (30 - b))
            reached = tl.sum(tl.where(key >= candidate, mass, 0.0)) >= target
            kth = tl.where(reached, candidate, kth)
        above = key > kth
        kth_value = kth.to(tl.float32, bitcast=True)
        # >= 1 since S(> v) < target; capped at the ties at v against rounding. v is 0 only when unreached.
        from_ties = tl.ceil(
            (target - tl.sum(tl.where(above, mass, 0.0))) / tl.where(kth_value > 0.0, kth_value, 1.0)
        )
        from_ties = tl.minimum(from_ties, tl.sum((key == kth).to(tl.float32))).to(tl.int32)
        need = tl.sum(above.to(tl.int32)) + from_ties
        need = tl.where(tl.sum(mass) < target, num_available, need)
        need = tl.where(target <= 0.0, 0, need)
    tl.store(NEED + row, tl.where(lazy, 0, need))
    tl.store(LAZY + row, lazy)
    tl.store(NUM_FORCED + row, tl.sum(forced.to(tl.int32)))
    tl.store(NUM_AVAILABLE + row, num_available)


@triton.jit
def _select_kernel(
    AHAT,
    ALLOWED,
    TAKE,
    KV_INDICES,
    KV_NUM_BLOCKS,
    stride_ab,
    stride_ah,
    stride_ai,
    stride_aj,
    stride_lb,
    stride_lh,
    stride_li,
    stride_lj,
    heads,
    nq,
    nk,
    n_sink,
    n_local,
    IS_CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    offs, value, forced, available = _load_row(
        AHAT, ALLOWED, row, stride_ab, stride_ah, stride_ai, stride_aj,
        stride_lb, stride_lh, stride_li, stride_lj, heads, nq, nk, n_sink, n_local, IS_CAUSAL, BLOCK_N,
    )  # fmt: skip
    take = tl.load(TAKE + row)
    # Order-preserving int32 key of any float (negatives: flip the magnitude bits), -0.0 as +0.0.
    bits = tl.where(value == 0.0, 0.0, value).to(tl.int32, bitcast=True)
    key = tl.where(available, bits ^ ((bits >> 31) & 0x7FFFFFFF), _INT_MIN)
    # The take-th largest key: the largest P with #(key >= P) >= take, sign bit first.
    kth = tl.where(tl.sum((key >= 0).to(tl.int32)) >= take, 0, _INT_MIN)
    # A loop, not unrolled: the scatter's addresses depend on kth, and torch's mutation analysis of a
    # traced launch (``wrap_triton``) walks every path through an unrolled chain (2^31 here).
    for b in range(31):
        candidate = kth | (1 << (30 - b))
        kth = tl.where(tl.sum((key >= candidate).to(tl.int32)) >= take, candidate, kth)
    above = key > kth
    tie = available & (key == kth)
    tie_rank = tl.cumsum(tie.to(tl.int32), 0)
    chosen = above | (tie & (tie_rank <= take - tl.sum(above.to(tl.int32))))
    selected = (forced | chosen).to(tl.int32)
    count = tl.sum(selected)
    out = KV_INDICES + row.to(tl.int64) * nk
    tl.store(out + tl.cumsum(selected, 0) - 1, offs, mask=selected != 0)
    tl.store(out + offs, nk, mask=(offs >= count) & (offs < nk))
    tl.store(KV_NUM_BLOCKS + row, count)


@triton.jit
def _chunk_take(
    NEED, LAZY, NUM_FORCED, NUM_AVAILABLE, row, first, offs, nq, share, min_blocks, max_blocks,
    dense_last_blocks,
):  # fmt: skip
    """(lazy, take, forced, available) of query blocks ``offs`` (in range: < nq) of the [nq] row at
    ``row`` (= (b, h) * nq), before the dense-head rule: the budget is the max need over the ``share``
    heads whose rows start at ``first``, clamped to [min_blocks, max_blocks]; lazy blocks take none; the
    last ``dense_last_blocks`` blocks are active and take every available block."""
    in_range = offs < nq
    budget = tl.zeros_like(offs)
    for g in range(share):
        budget = tl.maximum(budget, tl.load(NEED + first + g * nq + offs, mask=in_range, other=0))
    budget = tl.minimum(tl.maximum(budget, min_blocks), max_blocks)
    lazy = tl.load(LAZY + row + offs, mask=in_range, other=0) != 0
    forced = tl.load(NUM_FORCED + row + offs, mask=in_range, other=0)
    available = tl.load(NUM_AVAILABLE + row + offs, mask=in_range, other=0)
    take = tl.where(lazy, 0, tl.minimum(budget, available))
    final = offs >= nq - dense_last_blocks
    return lazy & ~final, tl.where(final, available, take), forced, available


@triton.jit
def _take_kernel(
    NEED,
    LAZY,
    NUM_FORCED,
    NUM_AVAILABLE,
    TAKE,
    LAZY_OUT,
    nq,
    share,
    min_blocks,
    max_blocks,
    dense_last_blocks,
    max_density,
    DENSE_HEADS: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """`reference.take_counts` for one (b, h) (program id) over [nq] int32 need / forced / available
    and bool lazy: writes take (int32) and the final lazy. ``share``: heads sharing the budget (a block
    of consecutive heads); ``max_blocks``: nk when unclamped. With DENSE_HEADS a first pass counts the
    head's selected and allowed blocks (float32 test, as the reference) and the second overrides."""
    bh = tl.program_id(0)
    row = bh.to(tl.int64) * nq
    first = (bh - bh % share).to(tl.int64) * nq
    dense = tl.zeros([], dtype=tl.int1)
    if DENSE_HEADS:
        selected = tl.zeros([], dtype=tl.int32)
        allowed = tl.zeros([], dtype=tl.int32)
        for start in range(0, nq, CHUNK):
            _, take, forced, available = _chunk_take(
                NEED, LAZY, NUM_FORCED, NUM_AVAILABLE, row, first, start + tl.arange(0, CHUNK),
                nq, share, min_blocks, max_blocks, dense_last_blocks,
            )  # fmt: skip
            selected += tl.sum(forced + take)
            allowed += tl.sum(forced + available)
        dense = selected.to(tl.float32) > allowed.to(tl.float32) * max_density
    for start in range(0, nq, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        lazy, take, _, available = _chunk_take(
            NEED, LAZY, NUM_FORCED, NUM_AVAILABLE, row, first, offs,
            nq, share, min_blocks, max_blocks, dense_last_blocks,
        )  # fmt: skip
        tl.store(TAKE + row + offs, tl.where(dense, available, take), mask=offs < nq)
        tl.store(LAZY_OUT + row + offs, lazy & (dense == 0), mask=offs < nq)
