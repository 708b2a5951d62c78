"""Random attention cases shared by the method tests: masks of every kind and hypothesis shapes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from omnicompile.kernels.masks import mask_bias

MASK_KINDS = ("none", "causal", "bool", "additive")


@dataclass(frozen=True)
class Case:
    """Shapes of one attention call: q [batch, heads, q_len, dim], k/v [batch, kv_heads, kv_len, dim]."""

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    dim: int
    mask_kind: str
    seed: int


cases = st.builds(
    Case,
    batch=st.integers(1, 2),
    heads=st.sampled_from([2, 4]),
    kv_heads=st.sampled_from([1, 2]),
    q_len=st.integers(1, 70),
    kv_len=st.integers(1, 70),
    dim=st.sampled_from([8, 16]),
    mask_kind=st.sampled_from(MASK_KINDS),
    seed=st.integers(0, 2**16),
)


def make_qkv(
    case: Case, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh Gaussian q, k, v for the case (seeded by case.seed)."""
    gen = torch.Generator().manual_seed(case.seed)
    q = torch.randn(case.batch, case.heads, case.q_len, case.dim, generator=gen)
    k = torch.randn(case.batch, case.kv_heads, case.kv_len, case.dim, generator=gen)
    v = torch.randn(case.batch, case.kv_heads, case.kv_len, case.dim, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def make_mask(case: Case) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) of the case's kind; bool/additive masks vary the broadcast shape and
    include whole masked rows, columns and 16x16 tiles (so some blocks are disallowed)."""
    if case.mask_kind in ("none", "causal"):
        return None, case.mask_kind == "causal"
    gen = torch.Generator().manual_seed(case.seed + 1)
    shapes = [
        (case.q_len, case.kv_len),
        (case.batch, 1, case.q_len, case.kv_len),
        (1, case.heads, case.q_len, case.kv_len),
        (case.batch, case.heads, case.q_len, case.kv_len),
    ]
    shape = shapes[case.seed % len(shapes)]
    keep = torch.rand(shape, generator=gen) < 0.6
    keep[..., : case.q_len // 3, :] = False  # fully masked rows
    keep[..., :, case.kv_len // 2 : case.kv_len // 2 + 17] = False  # masked columns spanning a block
    if case.mask_kind == "bool":
        return keep, False
    values = torch.randn(shape, generator=gen)
    return values.masked_fill(~keep, float("-inf")), False


def dense_bias(attn_mask: torch.Tensor | None, is_causal: bool, q_len: int, kv_len: int) -> torch.Tensor:
    """fp32 bias [Bm, Hm, Sq, Skv] over the full grid (small test sizes only)."""
    q_pos = torch.arange(q_len).view(1, 1, -1, 1)
    k_pos = torch.arange(kv_len).view(1, 1, 1, -1)
    return mask_bias(attn_mask, is_causal, q_len, kv_len, q_pos, k_pos)


def dense_probs(
    q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, scale: float
) -> torch.Tensor:
    """Exact attention probabilities fp32 [B, H, Sq, Skv] (fully masked rows all zero), small sizes only."""
    k = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q.float() @ k.transpose(-1, -2) * scale + dense_bias(
        attn_mask, is_causal, q.shape[2], k.shape[2]
    )
    return scores.softmax(-1).nan_to_num(0.0)
