"""Attention over a chunk with a cached prefix and over packed sequences, through the op (issue 20).

A chunk of ``n`` queries that are the last ``n`` positions of ``S`` keys (chunked prefill, a prefill
against an existing cache) attends bottom-right causally: query ``i`` sees keys ``0 .. S - n + i``.
The op's ``is_causal`` is SDPA's top-left causal, so `prefix_causal_attention` splits the keys where
the chunk starts, into two attentions the op runs as they are:

- the chunk against the cached prefix (keys ``0 .. S - n - 1``): every query sees every key, no mask;
- the chunk against itself (keys ``S - n .. S - 1``): plain causal;

and merges them exactly by their log-sum-exps (`merge.merge_attention`). ``min_seq_len`` is read
against what each part computes: the prefix part (most of a long chunked prefill's query-key pairs)
runs sparse once the chunk's whole key length S reaches it, as a one-shot prefill of S tokens would
(`prefix_config`); the chunk's own causal part is decided by its own length. Each part makes its own
selection against the keys it is given, reaching recall ``tau`` of that part's mass, so the merged
row keeps at least ``tau`` of its whole mass; with ``mode="dense"`` (or tau = 1) it equals dense
attention. The op's lse carries no gradient: where autograd needs gradients of q, k or v, the chunk
runs as one op call with the bottom-right causal mask as a bool [n, S] mask instead (exact, the op's
masked path).

`varlen_attention` takes packed sequences the way flash-attention's varlen API does (tokens of all
sequences concatenated, ``cu_seqlens`` their boundaries) and runs the op once per sequence: selection
and kernels per sequence, nothing spent across sequence boundaries.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor

from . import ops  # noqa: F401  (registers torch.ops.omnisparse.attention)
from .config import OmniSparseConfig
from .merge import merge_attention


def _config_json(config: OmniSparseConfig | str) -> str:
    """The op's config argument: a JSON string as given (the op parses and checks it)."""
    return config.to_json() if isinstance(config, OmniSparseConfig) else config


def _call(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    causal: bool,
    scale: float | None,
    config: str,
    site: str,
    softcap: float | None,
    need_lse: bool,
) -> tuple[Tensor, Tensor]:
    return torch.ops.omnisparse.attention(
        q,
        k,
        v,
        mask,
        0.0,
        causal,
        scale,
        q.shape[1] != k.shape[1],
        config,
        site,
        None,
        None,
        softcap,
        need_lse=need_lse,
    )


@functools.lru_cache(maxsize=16)
def _without_min_seq_len(config: str) -> tuple[int, str]:
    """``config``'s ``min_seq_len`` and the same config (JSON) with it at 0."""
    parsed = OmniSparseConfig.from_json(config)
    return parsed.min_seq_len, dataclasses.replace(parsed, min_seq_len=0).to_json()


def prefix_config(config: str, total: int) -> str:
    """The op config (JSON) of the chunk-against-prefix part of a chunk whose whole key length is
    ``total``: ``config`` with ``min_seq_len`` lifted (0) when ``total`` reaches it, else ``config``."""
    min_seq_len, lifted = _without_min_seq_len(config)
    return config if total < min_seq_len else lifted


def bottom_right_causal_mask(q_len: int, kv_len: int, device: torch.device | str | None = None) -> Tensor:
    """bool [q_len, kv_len], True = keep: query i sees keys ``0 .. kv_len - q_len + i``."""
    rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    return torch.arange(kv_len, device=device)[None, :] <= rows


def prefix_causal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    config: OmniSparseConfig | str,
    scale: float | None = None,
    softcap: float | None = None,
    site: str = "chunk",
) -> Tensor:
    """Bottom-right causal attention of a chunk (module docstring), [B, H, n, Dv] in q's dtype.

    Args:
        q: [B, H, n, D], the queries of the last n positions; k, v: [B, Hkv, S, D] / [B, Hkv, S, Dv],
            S >= n, H a multiple of Hkv (grouped-query attention is inferred from the head counts).
        config: the op's config (an `OmniSparseConfig` or its JSON).
        scale: score scale, None = 1 / sqrt(D); softcap: logit soft-cap, or None.
        site: the name the op logs and records, suffixed ``.prefix`` / ``.chunk`` for the two parts.

    Raises ``ValueError`` for ``n > S`` (and whatever the op rejects).
    """
    config = _config_json(config)
    n, total = q.shape[2], k.shape[2]
    if n > total:
        raise ValueError(f"prefix_causal_attention: {n} queries but only {total} keys (needs n <= S)")
    prefix = total - n
    if prefix == 0:
        return _call(q, k, v, None, True, scale, config, site, softcap, False)[0]
    if n == 1:  # one query sees every key
        return _call(q, k, v, None, False, scale, config, site, softcap, False)[0]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        mask = bottom_right_causal_mask(n, total, q.device)
        return _call(q, k, v, mask, False, scale, config, site, softcap, False)[0]
    on_prefix = prefix_config(config, total)
    k_prefix, v_prefix = k[:, :, :prefix], v[:, :, :prefix]
    parts = [
        _call(q, k_prefix, v_prefix, None, False, scale, on_prefix, f"{site}.prefix", softcap, True),
        _call(
            q, k[:, :, prefix:], v[:, :, prefix:], None, True, scale, config, f"{site}.chunk", softcap, True
        ),
    ]
    out, _ = merge_attention([out for out, _ in parts], [lse for _, lse in parts])
    return out


def _check_cu_seqlens(cu_seqlens: Tensor, tokens: int, name: str) -> list[int]:
    """``cu_seqlens`` as a host list, checked: 1-D integer, from 0 up to ``tokens``, non-decreasing."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype.is_floating_point:
        raise ValueError(
            f"{name} must be a 1-D integer tensor [N + 1], got {tuple(cu_seqlens.shape)} {cu_seqlens.dtype}"
        )
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != tokens or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"{name} must rise from 0 to the token count {tokens}, got {bounds}")
    return bounds


def varlen_mask(
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, causal: bool = True, device: torch.device | str | None = None
) -> Tensor:
    """bool [Tq, Tk], True = keep: what `varlen_attention` computes as one masked attention (each
    sequence's queries see its own keys, bottom-right causal if ``causal``)."""
    seq_q = _sequence_ids(cu_seqlens_q, device)
    seq_k = _sequence_ids(cu_seqlens_k, device)
    keep = seq_q[:, None] == seq_k[None, :]
    if causal:  # query at offset i of a sequence with m queries and t keys sees key offsets <= t - m + i
        ends_q, ends_k = cu_seqlens_q.to(device)[1:], cu_seqlens_k.to(device)[1:]
        from_end_q = ends_q[seq_q] - torch.arange(seq_q.numel(), device=device)  # m - i
        from_end_k = ends_k[seq_k] - torch.arange(seq_k.numel(), device=device)  # t - c
        keep &= from_end_k[None, :] >= from_end_q[:, None]
    return keep


def _sequence_ids(cu_seqlens: Tensor, device: torch.device | str | None) -> Tensor:
    """int64 [T]: the sequence each token of ``cu_seqlens`` [N + 1] belongs to."""
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    return torch.repeat_interleave(torch.arange(cu.numel() - 1, device=device), cu.diff())


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    config: OmniSparseConfig | str,
    causal: bool = True,
    scale: float | None = None,
    softcap: float | None = None,
    site: str = "varlen",
) -> Tensor:
    """Attention of packed sequences, flash-attention's varlen layout; [Tq, H, Dv] in q's dtype.

    Args:
        q: [Tq, H, D], the queries of N sequences one after another; k, v: [Tk, Hkv, D] / [Tk, Hkv, Dv].
        cu_seqlens_q, cu_seqlens_k: integer [N + 1], sequence j's queries are rows
            ``cu_seqlens_q[j] : cu_seqlens_q[j + 1]`` (keys alike).
        causal: bottom-right causal within each sequence (`prefix_causal_attention`; top-left and
            bottom-right agree when a sequence has as many queries as keys), else every query of a
            sequence sees all its keys.
        config, scale, softcap, site: as `prefix_causal_attention` (site suffixed with the sequence).

    A sequence with no query contributes nothing; one with queries but no key is an error. Raises
    ``ValueError`` for malformed ``cu_seqlens`` or mismatched counts.
    """
    config = _config_json(config)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"varlen_attention takes q, k, v as [T, H, D], got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D"
        )
    bounds_q = _check_cu_seqlens(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
    bounds_k = _check_cu_seqlens(cu_seqlens_k, k.shape[0], "cu_seqlens_k")
    if len(bounds_q) != len(bounds_k):
        raise ValueError(f"cu_seqlens_q has {len(bounds_q) - 1} sequences, cu_seqlens_k {len(bounds_k) - 1}")
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, T, D]
    for j, (q0, q1, k0, k1) in enumerate(zip(bounds_q, bounds_q[1:], bounds_k, bounds_k[1:])):
        if q1 == q0:
            continue
        if k1 == k0:
            raise ValueError(f"varlen_attention: sequence {j} has {q1 - q0} queries and no key")
        queries, keys, values = qh[:, :, q0:q1], kh[:, :, k0:k1], vh[:, :, k0:k1]
        name = f"{site}.seq{j}"
        if causal:
            rows = prefix_causal_attention(queries, keys, values, config, scale, softcap, name)
        else:
            rows = _call(queries, keys, values, None, False, scale, config, name, softcap, False)[0]
        out[q0:q1] = rows[0].transpose(0, 1)
    return out
