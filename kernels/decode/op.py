"""``torch.ops.omnisparse.slim_decode``: slim decode attention as a custom op, so that Dynamo traces a
decode step through it without a graph break (a fake implementation gives the output shapes) and
Inductor's CUDA graphs replay the kernel with the rest of the step.

The op runs `triton_decode.slim_decode` where `triton_decode.supported`, else `reference.slim_decode`
(the reason logged once). It takes the `SlimKV` as its tensors; the tail length T is the device
tensor ``kv.tail_length``, so the op's inputs keep their shapes and addresses while a static tail fills.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from . import reference, triton_decode
from .slim_kv import SlimKV

_logger = logging.getLogger(__name__)
_logged_fallbacks: set[str] = set()


@torch.library.custom_op("omnisparse::slim_decode", mutates_args=())
def slim_decode_op(
    q: Tensor,
    k_packed: Tensor,
    v_packed: Tensor,
    offsets: Tensor,
    lengths: Tensor,
    k_tail: Tensor,
    v_tail: Tensor,
    tail_length: Tensor,
    max_length: int,
    scale: float | None,
) -> tuple[Tensor, Tensor]:
    """(out [B, H, n, D] in q's dtype, lse float32 [B, H, n]), both contiguous; see `slim_decode`."""
    # static=True: T is read from tail_length, never from the tail's shape.
    kv = SlimKV(k_packed, v_packed, offsets, lengths, max_length, k_tail, v_tail, tail_length, static=True)
    reason = triton_decode.supported(q, kv, scale)
    if reason is None:
        out, lse = triton_decode.slim_decode(q, kv, scale)
    else:
        if reason not in _logged_fallbacks:
            _logged_fallbacks.add(reason)
            _logger.info("slim decode runs the PyTorch reference: %s", reason)
        out, lse = reference.slim_decode(q, kv, scale)
    return out.contiguous(), lse.contiguous()


@slim_decode_op.register_fake
def _slim_decode_fake(q: Tensor, *_args) -> tuple[Tensor, Tensor]:
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def slim_decode(q: Tensor, kv: SlimKV, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Slim decode attention through the op: the Triton kernel where supported, else the reference.

    Args:
        q: [B, H, n, D], the n newest tokens' queries (their keys are the last n of the T tail tokens).
        kv: the layer's `SlimKV`.
        scale: score scale, default 1/sqrt(D).

    Returns:
        out [B, H, n, D] in q's dtype and lse float32 [B, H, n].
    """
    return slim_decode_op(q, *kv.tensors(), kv.max_length, scale)
