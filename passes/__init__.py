"""FX passes that rewrite attention in a Dynamo graph into ``torch.ops.omnisparse.attention``.

`run_passes` copies the graph, runs `PASSES` in order on the copy (each a plain function over a
GraphModule that reports whether it changed it), cleans up after each pass that changed something,
and returns the rewritten copy with one `SiteRecord` per attention site found. The input graph is
never modified, so a caller can always fall back to it. The rewrite passes put the op in place of
attention; `mask_from_positions` then decides each op's mask from the graph that builds it. The last
pass, `softmax_last_dim`, is not an attention rewrite: it keeps Inductor's fused-attention patterns
off softmaxes over other dimensions. `plugin_attention.py` is a Torch-TensorRT-only
rewrite (the op into plugin-shaped ops), deliberately not in `PASSES`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

from torch.fx import GraphModule

from omnicompile.config import OmniSparseConfig

from .cleanup import clean_up_graph
from .mask_from_positions import mask_from_positions
from .replace_eager_attention import replace_eager_attention
from .replace_sdpa import replace_sdpa
from .site_record import MaskKind, PassContext, SiteRecord, SiteStatus
from .softmax_last_dim import softmax_last_dim

Pass = Callable[[GraphModule, PassContext], bool]

PASSES: tuple[Pass, ...] = (replace_sdpa, replace_eager_attention, mask_from_positions, softmax_last_dim)


@dataclass(frozen=True)
class PassReport:
    """The outcome of `run_passes`.

    Attributes:
        graph_module: the rewritten copy (a copy even when nothing changed).
        changed: whether any pass changed the graph.
        sites: every attention site found, in pass order then graph order.
    """

    graph_module: GraphModule
    changed: bool
    sites: tuple[SiteRecord, ...]


def run_passes(gm: GraphModule, config: OmniSparseConfig, site_prefix: str = "") -> PassReport:
    """Run `PASSES` on a copy of ``gm``; ``config`` travels into the graph as the op's JSON argument.

    Site names are ``site_prefix`` + the node name (node names are unique within one graph only).
    """
    copied = copy_graph_module(gm)
    ctx = PassContext(config_json=config.to_json(), site_prefix=site_prefix)
    changed = False
    for rewrite in PASSES:
        if rewrite(copied, ctx):
            clean_up_graph(copied)
            changed = True
    return PassReport(copied, changed, tuple(ctx.sites))


def copy_graph_module(gm: GraphModule) -> GraphModule:
    """A GraphModule over a copy of ``gm``'s graph, sharing its parameters and buffers.

    Nodes are new (node meta is copied shallowly: the example values are shared, never mutated);
    ``gm``'s other attributes (Dynamo's ``meta``, ``shape_env``, ...) and the ``_dynamo_source`` of
    its placeholders (which AOT autograd reads) are carried over.
    """
    copied = GraphModule(gm, copy.deepcopy(gm.graph))
    for original, placeholder in zip(
        gm.graph.find_nodes(op="placeholder"), copied.graph.find_nodes(op="placeholder")
    ):
        if hasattr(original, "_dynamo_source"):
            placeholder._dynamo_source = original._dynamo_source
    for name in vars(gm).keys() - vars(copied).keys():
        setattr(copied, name, getattr(gm, name))
    copied.meta = dict(gm.meta)
    return copied


__all__ = [
    "PASSES",
    "MaskKind",
    "Pass",
    "PassContext",
    "PassReport",
    "SiteRecord",
    "SiteStatus",
    "copy_graph_module",
    "mask_from_positions",
    "replace_eager_attention",
    "replace_sdpa",
    "run_passes",
    "softmax_last_dim",
]
