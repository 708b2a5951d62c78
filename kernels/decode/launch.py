"""Launch geometry of the decode kernel (`triton_decode`): the query rows one program owns."""

from __future__ import annotations

import triton

from ..triton_utils import head_dim_pad


def row_tile(rows: int, head_dim: int) -> int:
    """Query rows per program for ``rows`` = G * n rows of a KV head: a power of two in [16, 64], at
    most 32 above D = 128 (sm_90: 64 rows x 256 spill and fill the shared memory at 3 stages; 32
    rows take 188 registers, 148 KB)."""
    return max(16, min(64 if head_dim_pad(head_dim) <= 128 else 32, triton.next_power_of_2(rows)))


def key_tile(head_dim: int, itemsize: int) -> int:
    """Keys per step of the split loop: 64, or 32 for fp32 above D = 128 (sm_90: 64 fp32 keys x 256
    need 303 KB of shared memory at the default stages, over the 227 KB limit)."""
    return 32 if itemsize > 2 and head_dim_pad(head_dim) > 128 else 64
