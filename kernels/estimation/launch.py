"""`LaunchConfig`: tiles and schedule of the fused estimation kernels, the composite / pooled
estimator (`triton_composite`) and the row probe (`triton_probe`), and their default
(`default_launch`).

One config launches one kernel: the composite estimator reads ``block_u``, ``block_w``,
``num_warps`` and ``num_stages``; the row probe ``block_r``, ``block_n``, ``split_n``, ``num_warps``
and ``num_stages``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..triton_utils import head_dim_pad


@dataclass(frozen=True)
class LaunchConfig:
    """Tile shapes and schedule of a fused estimation kernel.

    Composite estimator: ``block_u`` query and ``block_w`` key composites per step (raised to b / g
    where smaller). Row probe: ``block_r`` probe rows (query blocks) and ``block_n`` keys (raised to
    the block size where smaller) per step; ``split_n`` keys per program (raised to a multiple of
    ``block_n``, and so that a row tile holds at most `triton_probe.MAX_SPLIT_STATS` rows x splits).
    ``num_warps``, ``num_stages``: those of the kernel launched.
    """

    block_u: int = 64
    block_w: int = 64
    num_warps: int = 4
    num_stages: int = 2
    block_r: int = 64
    block_n: int = 64
    split_n: int = 1024


def default_launch(head_dim: int, windowed: bool) -> LaunchConfig:
    """The launch config for a head dim and window presence, spill-free on sm_90 (triton.compile for
    sm_90, cuobjdump -res-usage; notes/prefill_kernel.md): 64 x 64 composite tiles take 135-176
    registers at D <= 128 without a window, but 254-255 at D = 256 or with the window's band counts;
    64 x 32 tiles take 127-168 there. The row probe's tiles are the field defaults: 64 probe rows a
    program (an H100 sweep, `bench_prefill.py --sweep`, 2026-12-07: 0.37 -> 0.21 ms at SmolLM2's
    shapes at 32K, 24.5 -> 8.6 ms at H 32 / D 128 at 128K, against 16 rows; 6.6 ms with the one-pass
    probe, same sweep)."""
    if windowed or head_dim_pad(head_dim) > 128:
        return LaunchConfig(block_w=32)
    return LaunchConfig()
