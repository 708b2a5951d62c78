"""Pass: move every softmax over a non-last dimension to the last one, between two transposes.

``softmax(x, dim=d)`` with d != -1 becomes ``softmax(x.transpose(d, -1), dim=-1).transpose(d, -1)``:
the same values. Why: this backend hands its graphs to Inductor, whose fused-attention patterns
(``torch._inductor.fx_passes.fuse_attention``) match ``softmax(q @ k.T, dim=-2) @ v``, a softmax over
the queries that is not attention, and replace it by SDPA: a wrong result (upstream pytorch issue
196468; reproduced with torch 2.13). With the transposes in between, those patterns no longer match,
and Inductor fuses the transposes into the softmax kernel. Attention itself (a last-dim softmax) is
left alone: the rewrite passes before this one have taken it.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from .node_patterns import SOFTMAX, example_value, normalized_dim
from .site_record import PassContext


def softmax_last_dim(gm: GraphModule, ctx: PassContext) -> bool:
    """Rewrite ``gm``'s non-last-dim softmaxes in place; returns whether the graph changed."""
    changed = False
    for node in list(gm.graph.nodes):
        bound, value = SOFTMAX.bind(node), example_value(node)
        if bound is None or value is None:
            continue
        dim = normalized_dim(bound["dim"], value.dim())
        if dim is None or dim == value.dim() - 1:
            continue
        with gm.graph.inserting_before(node):
            moved = gm.graph.call_function(torch.transpose, (bound["input"], dim, -1))
            softmax = gm.graph.call_function(torch.softmax, (moved, -1), {"dtype": bound["dtype"]})
            back = gm.graph.call_function(torch.transpose, (softmax, dim, -1))
        node.replace_all_uses_with(back)
        gm.graph.erase_node(node)
        changed = True
    return changed
