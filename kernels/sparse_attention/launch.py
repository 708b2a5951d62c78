"""`LaunchConfig`: tiles and schedule of the sparse attention kernels, forward (`triton_fwd`) and
backward (`triton_bwd`), their defaults (`default_launch`, `default_backward_launch`) and the
forward's work order (`unit_order`).

One config launches one pass: the forward reads ``block_m``, ``block_n``, ``num_warps``, ``tma``,
``num_stages`` and ``schedule``; the backward ``dq_*``, ``dkdv_*``, ``num_warps`` and ``num_stages``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..triton_utils import head_dim_pad


@dataclass(frozen=True)
class LaunchConfig:
    """Tile shapes and schedule of one pass of the sparse attention kernels.

    Forward: ``block_m`` and ``block_n`` divide the selection's block size; ``block_m`` rows of one
    query block per program, ``block_n`` keys per inner step; ``schedule``: the order of the work
    list (`unit_order`). ``"causal"`` is the default: on an H100 (2026-12-06,
    `benchmarks/bench_schedule.py`, `mixed` presets, 32K and 128K, every budget scope) heaviest
    first was up to 41% slower (270-475 TFLOP/s on computed blocks against 440-490 in causal
    order): sorting scatters one KV head's query blocks across the launch, away from its K/V in L2.
    The forward's defaults per block size, dtype, mask and head dim are `default_launch`'s.

    Backward: dq kernel: query tile ``dq_block_m`` x key sub-tile ``dq_block_n``. dk/dv kernel: key
    tile ``dkdv_block_n`` x query sub-tile ``dkdv_block_m``, at most ``dkdv_chunk`` (query head,
    query block) entries per program (``None``: no limit, never atomics). Block sizes are powers of
    two, capped at the selection's block size. The field defaults are the backward's up to D = 128
    (`default_backward_launch`).

    ``num_warps``, ``num_stages``: those of the pass's kernels. ``tma``: the forward reads K and V
    through host TMA descriptors (`triton_utils.tma_descriptors`; pointer loads where TMA cannot
    take the tensors).
    """

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    schedule: Literal["heaviest_first", "causal"] = "causal"
    tma: bool = False
    dq_block_m: int = 64
    dq_block_n: int = 32
    dkdv_block_m: int = 32
    dkdv_block_n: int = 64
    dkdv_chunk: int | None = 128


def default_launch(block_size: int, dtype: torch.dtype, has_mask: bool, head_dim: int = 128) -> LaunchConfig:
    """The forward's launch config for a selection block size, dtype, mask presence and head dim.

    Chosen from sm_90 resource reports (no register spills; K/V pipelined num_stages deep) and an
    H100 sweep (notes/prefill_kernel.md: 64/64/4 warps/3 stages fastest at D = 128; 8 warps 2x
    slower; 4 stages leave one program per SM). An attn_mask tile costs registers: narrower key
    steps. Head dims above 128 (256: 64 x 256 fp32 accumulators) need 8 warps and 2 stages to stay
    spill-free (4 warps spill 120-256 B; 3 stages of 64-key tiles need 224 KB of shared memory).
    K/V through TMA at head dim 128 (padded): 4-6% faster on an H100 (2026-12-07,
    `benchmarks/bench_fwd_tiles.py`, 64K, full / mixed / structured selections: 510 -> 535, 480 ->
    499, 349 -> 371 TFLOP/s); at 64 it was 2-7% slower below full density, so pointer loads stay there.
    """
    block_m = min(block_size, 64)
    if dtype == torch.float32:  # interpreter only (see `triton_fwd.supported`)
        return LaunchConfig(block_m, min(block_size, 32), num_warps=4, num_stages=2)
    block_n = min(block_size, 32 if has_mask else 64)
    if head_dim_pad(head_dim) > 128:
        return LaunchConfig(block_m, block_n, num_warps=8, num_stages=2)
    return LaunchConfig(block_m, block_n, num_warps=4, num_stages=3, tma=head_dim_pad(head_dim) == 128)


def default_backward_launch(head_dim: int) -> LaunchConfig:
    """The backward's tiles for a head dim, spill-free on sm_90 above 128 (triton.compile for sm_90,
    cuobjdump -res-usage): at 256, dq 32 x 32 (182 registers; 64 x 32 spills 176 B) and dk/dv 32 keys
    x 16 queries (240; 64 keys spill >= 864 B at 4 or 8 warps). Up to 128 the defaults of
    `LaunchConfig` (there dk/dv spills 64 B at D = 128, as before windows were added)."""
    if head_dim_pad(head_dim) > 128:
        return LaunchConfig(dq_block_m=32, dq_block_n=32, dkdv_block_m=16, dkdv_block_n=32)
    return LaunchConfig()


def unit_order(kv_num_blocks: Tensor, kv_heads: int, schedule: str) -> Tensor | None:
    """int32 [B * Hkv * nq]: the (batch, KV head, query block) units, flattened row-major, in launch order;
    None for the order the kernel computes from the program id.

    kv_num_blocks: int32 [B, H, nq]. ``"heaviest_first"``: by the largest count among the unit's
    H / Hkv heads, descending (stable: ties keep the last query block first); ``"causal"``: None, the
    kernel's own order (each (batch, KV head)'s last query block first).
    """
    if schedule == "causal":
        return None
    batch, heads, nq = kv_num_blocks.shape
    units = torch.arange(batch * kv_heads * nq, dtype=torch.int32, device=kv_num_blocks.device)
    causal = units.view(batch * kv_heads, nq).flip(-1).flatten()
    work = kv_num_blocks.view(batch, kv_heads, heads // kv_heads, nq).amax(2).flatten()[causal.long()]
    return causal[torch.argsort(work, descending=True, stable=True)]
