"""What the passes report about each attention site, and the context they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from omnicompile.kernels.masks import MaskKind

SiteStatus = Literal["replaced", "untouched"]
Pattern = Literal["sdpa", "eager"]
Shape = tuple[int | str, ...]


@dataclass(frozen=True)
class SiteRecord:
    """One attention site found in a graph.

    Attributes:
        site: the site's name, unique within its graph: the name of the graph node whose value the
            attention produces (the SDPA call, or the final ``matmul`` of hand-written attention).
            A replaced site passes the same string to the op as its ``site`` argument.
        pattern: ``"sdpa"`` (a scaled_dot_product_attention call) or ``"eager"`` (hand-written).
        shapes: (q, k, v) shapes from the graph's example values, k and v as the op gets them
            (before ``repeat_kv`` when it was folded into ``enable_gqa``); a symbolic size is its
            symbol's name; ``()`` where no example value was recorded.
        mask: ``"none"``, ``"causal"`` (``is_causal=True``), ``"bool"`` or ``"additive"``: what the op
            gets, after `mask_from_positions` (a mask proven causal is ``"causal"``, one proven to keep
            everything ``"none"``).
        gqa: whether the site has fewer KV heads than query heads (as the op gets them).
        status: ``"replaced"`` (the op now computes it) or ``"untouched"``.
        reason: why the site was left untouched; ``""`` when replaced.
        window: the sliding window proven for a causal site (query row r sees keys r - window < c <= r).
        mask_checked: whether the op gets a ``causal_mask_check`` of its mask (the mask is unknown at
            compile time; checked once per forward).
    """

    site: str
    pattern: Pattern
    shapes: tuple[Shape, Shape, Shape]
    mask: MaskKind
    gqa: bool
    status: SiteStatus
    reason: str = ""
    window: int | None = None
    mask_checked: bool = False


@dataclass
class PassContext:
    """What every pass gets beside the graph: the op's config argument, the prefix that makes site
    names unique across graphs, and the site records."""

    config_json: str
    site_prefix: str = ""
    sites: list[SiteRecord] = field(default_factory=list)
