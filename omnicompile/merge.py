"""Exact merging of partial attentions over disjoint key sets (chunked prefill, context parallelism).

Attention over keys K = K_1 u ... u K_n (disjoint) is the merge of the attentions over each K_i, given
each one's output and log-sum-exp (the op's ``(out, lse)``; FlashInfer's ``merge_state``)::

    lse = logsumexp_i lse_i,    out = sum_i exp(lse_i - lse) * out_i

A part whose row sees no key (lse_i = -inf) weighs 0; a row that sees no key in any part gets out 0,
lse -inf (the op's fully masked row).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def merge_attention(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(out [B, H, Sq, Dv] in outs' dtype, lse float32 [B, H, Sq]) of the attention over the union of the
    parts' keys.

    outs: n >= 1 tensors [B, H, Sq, Dv], one dtype; lses: their float32 [B, H, Sq] natural-log
    log-sum-exps (-inf where a row saw no key). The merge runs in fp32. Raises ``ValueError`` for
    mismatched counts or shapes.
    """
    if not outs or len(outs) != len(lses):
        raise ValueError(
            f"merge_attention needs one lse per output, got {len(outs)} outputs, {len(lses)} lses"
        )
    for out, lse in zip(outs, lses):
        if out.shape != outs[0].shape or out.dtype != outs[0].dtype or lse.shape != out.shape[:-1]:
            raise ValueError(
                f"merge_attention: output {tuple(out.shape)} ({out.dtype}) and lse {tuple(lse.shape)} do not "
                f"match the first output {tuple(outs[0].shape)} ({outs[0].dtype})"
            )
    stacked = torch.stack([lse.float() for lse in lses])  # [n, B, H, Sq]
    lse = torch.logsumexp(stacked, 0)  # -inf where every part is -inf
    weights = torch.exp(stacked - torch.where(torch.isfinite(lse), lse, 0.0))  # 0 where lse_i = -inf
    out = sum(w.unsqueeze(-1) * o.float() for w, o in zip(weights, outs))
    return out.to(outs[0].dtype), lse
