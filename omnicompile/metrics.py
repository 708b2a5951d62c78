"""Measures of a selection: exact block mass and recall, density, lazy fraction, relative error.

These cost an exact pass over the attention (chunked over query blocks, never a [Sq, Skv] matrix)
and are meant for tests, benchmarks and ``omnicompile.explain``, not the hot path. They synchronise
with the host to return Python floats.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .kernels.estimation import composite_estimate
from .kernels.masks import resolve_scale
from .kernels.selection import BlockSelection


def exact_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    block_size: int,
    query_chunk: int = 4,
    *,
    softcap: float | None = None,
) -> torch.Tensor:
    """Exact attention mass of query block i on key block j, averaged over i's attending rows.

    float32 [B, H, nq, nk]. It is the composite estimate at granularity 1: composite tokens of one
    token are the tokens, so the score (soft-capped at ``softcap`` if given) is exact. Memory per
    chunk: B * H * query_chunk * block_size * Skv floats. Rows with no unmasked key take no part in
    the average.
    """
    scale = resolve_scale(scale, q.shape[-1])
    return composite_estimate(q, k, attn_mask, is_causal, scale, block_size, 1, query_chunk, softcap=softcap)


def exact_recall(mass: torch.Tensor, selection: BlockSelection) -> torch.Tensor:
    """float32 [B, H, nq]: true attention mass on the selected blocks, averaged over each block's rows,
    from the exact block mass float32 [B, H, nq, nk] (`exact_block_mass`).

    A query block none of whose rows sees any key has nothing to recall and gets 1.
    """
    recall = (mass * selection.dense_mask()).sum(-1)
    return torch.where(mass.sum(-1) > 0, recall, 1.0)


def density(selection: BlockSelection, allowed: torch.Tensor) -> float:
    """Computed blocks / allowed blocks over all (b, h, i); allowed: bool broadcastable to [B, H, nq, nk]."""
    allowed_total = allowed.expand(selection.kv_indices.shape).sum()
    return (selection.kv_num_blocks.sum() / allowed_total.clamp(min=1)).item()


def dense_heads(selection: BlockSelection, allowed: torch.Tensor) -> float:
    """Fraction of the (b, h) whose selection holds every allowed block (exact attention: the
    ``dense_fallback_density`` rule, or a selection that took everything); allowed as `density`."""
    allowed_per_head = allowed.expand(selection.kv_indices.shape).sum((-1, -2))
    return (selection.kv_num_blocks.sum(-1) == allowed_per_head).float().mean().item()


def lazy_fraction(selection: BlockSelection) -> float:
    """Fraction of the (b, h, i) query blocks classified lazy."""
    return selection.lazy.float().mean().item()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32 (0 when both are zero)."""
    diff = (out.float() - ref.float()).norm()
    return (diff / ref.float().norm().clamp(min=torch.finfo(torch.float32).tiny)).item()


@dataclass(frozen=True)
class SelectionStats:
    """Summary of one selection.

    Attributes:
        density: computed / allowed blocks.
        dense_heads: fraction of (b, h) computing every allowed block (`dense_heads`).
        recall_mean, recall_min: mean and worst exact recall over (b, h, i) (``exact_recall``).
        lazy_fraction: fraction of lazy (b, h, i).
        budget_mean: mean non-forced blocks taken per active (b, h, i) (0 when none is active).
    """

    density: float
    dense_heads: float
    recall_mean: float
    recall_min: float
    lazy_fraction: float
    budget_mean: float

    def as_dict(self) -> dict[str, float]:
        """The fields as a plain dict."""
        return asdict(self)


def selection_stats(selection: BlockSelection, mass: torch.Tensor, allowed: torch.Tensor) -> SelectionStats:
    """`SelectionStats` of a selection, given the exact block mass float32 [B, H, nq, nk]
    (`exact_block_mass`) and the allowed blocks, bool broadcastable to it (`masks.allowed_blocks`)."""
    recall = exact_recall(mass, selection)
    active = ~selection.lazy
    budget_mean = (selection.budget * active).sum() / active.sum().clamp(min=1)
    return SelectionStats(
        density=density(selection, allowed),
        dense_heads=dense_heads(selection, allowed),
        recall_mean=recall.mean().item(),
        recall_min=recall.min().item(),
        lazy_fraction=lazy_fraction(selection),
        budget_mean=budget_mean.item(),
    )
