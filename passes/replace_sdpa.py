"""Pass: replace every ``scaled_dot_product_attention`` call by ``torch.ops.omnisparse.attention``.

Matches ``torch.nn.functional.scaled_dot_product_attention`` (the same builtin as
``torch._C._nn.scaled_dot_product_attention``) in any call form: positional, keyword, or mixed as
transformers 5.x emits it (``(q, k, v, attn_mask=None, dropout_p=0.0, scale=s, is_causal=True,
enable_gqa=True)``). Keys and values expanded by ``repeat_kv`` are replaced by the KV heads and
``enable_gqa=True``. Calls the op cannot take stay as they are, with the reason recorded.
"""

from __future__ import annotations

from torch.fx import GraphModule

from .attention_site import AttentionCall, rewrite_site
from .node_patterns import SDPA
from .site_record import PassContext, SiteRecord


def replace_sdpa(gm: GraphModule, ctx: PassContext) -> bool:
    """Rewrite the SDPA calls of ``gm`` in place; returns whether the graph changed."""
    changed = False
    for node in list(gm.graph.nodes):
        if not SDPA.matches(node):
            continue
        bound = SDPA.bind(node)
        if bound is None:
            reason = f"arguments do not fit SDPA's signature: {node.args}, {node.kwargs}"
            site = ctx.site_prefix + node.name
            ctx.sites.append(SiteRecord(site, "sdpa", ((), (), ()), "none", False, "untouched", reason))
            continue
        changed |= rewrite_site(gm, ctx, node, "sdpa", AttentionCall(**bound))
    return changed
