"""Measures of a selection: exact block mass and recall, the per-head oracle's density, density, lazy
fraction, relative error.

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


def oracle_density(mass: torch.Tensor, allowed: torch.Tensor, recall: float) -> tuple[float, float]:
    """(density, threshold): the per-(b, h, i) oracle whose mean recall equals ``recall``: each row
    takes the fewest blocks, in descending exact mass, whose mass reaches one threshold t.

    mass: float32 [B, H, nq, nk] exact block mass (rows sum to 1 where a row sees a key); allowed: bool
    broadcastable to it. Bisection on the per-row threshold t (mean recall is non-decreasing in t).
    """
    ranked = mass.masked_fill(~allowed, 0.0).sort(-1, descending=True).values
    cumulative = ranked.cumsum(-1)
    live = cumulative[..., -1] > 0
    total_allowed = allowed.expand(mass.shape).sum().clamp(min=1)

    def at(t: float) -> tuple[float, float]:
        count = (torch.searchsorted(cumulative, torch.full_like(cumulative[..., :1], t)) + 1).clamp(
            max=mass.shape[-1]
        )
        got = cumulative.gather(-1, count - 1).squeeze(-1)
        got = torch.where(live, got, 1.0)
        count = torch.where(live, count.squeeze(-1), 0)
        return (count.sum() / total_allowed).item(), got.mean().item()

    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if at(mid)[1] < recall:
            lo = mid
        else:
            hi = mid
    return at(hi)[0], hi


def density(selection: BlockSelection, allowed: torch.Tensor) -> float:
    """Computed blocks / allowed blocks over all (b, h, i); allowed: bool broadcastable to [B, H, nq, nk]."""
    allowed_total = allowed.expand(selection.kv_indices.shape).sum()
    return (selection.kv_num_blocks.sum() / allowed_total.clamp(min=1)).item()


def head_densities(selection: BlockSelection, allowed: torch.Tensor) -> torch.Tensor:
    """float32 [B, H]: computed / allowed blocks of each (b, h); allowed as `density`."""
    allowed_per_head = allowed.expand(selection.kv_indices.shape).sum((-1, -2))
    return selection.kv_num_blocks.sum(-1) / allowed_per_head.clamp(min=1)


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
