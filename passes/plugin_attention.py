"""Pass: put the plugin form of the op in place of ``torch.ops.omnisparse.attention`` (for TensorRT).

Torch-TensorRT generates a TensorRT plugin from a custom op's schema, but only for arguments that
are tensors followed by ``int``, ``float``, ``bool`` or ``str`` attributes: ``Tensor? attn_mask``
and ``float? scale`` have no plugin form, and the plugin's outputs all take the first input's dtype
(the float32 ``lse`` would not). So two inference-only ops, each returning ``out`` alone::

    omnisparse::attention_plugin(Tensor q, Tensor k, Tensor v, bool is_causal, float scale,
                                 bool enable_gqa, str config, str site) -> Tensor
    omnisparse::attention_plugin_masked(Tensor q, Tensor k, Tensor v, Tensor attn_mask, float scale,
                                        bool enable_gqa, str config, str site) -> Tensor

each calling ``torch.ops.omnisparse.attention``. `use_plugin_attention` rewrites
``getitem(attention(...), 0)`` into them, with ``scale=None`` resolved to ``1/sqrt(head_dim)``; a site
whose ``lse`` is used, whose scale is symbolic, or that has a sliding ``window`` or a ``softcap`` (no
plugin attribute holds an optional int or float) stays as it is; a ``mask_check`` is dropped (the
masked plugin computes the same attention from the mask). It works on Dynamo graphs
(``meta["example_value"]``) and on ``torch.export`` graphs (``meta["val"]``).
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from .attention_site import ATTENTION, attention_args


@torch.library.custom_op("omnisparse::attention_plugin", mutates_args=())
def attention_plugin(
    q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float, enable_gqa: bool, config: str, site: str
) -> Tensor:
    """``omnisparse.attention`` without a mask, its output only."""
    return ATTENTION(q, k, v, None, 0.0, is_causal, scale, enable_gqa, config, site, need_lse=False)[0]


@torch.library.custom_op("omnisparse::attention_plugin_masked", mutates_args=())
def attention_plugin_masked(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor, scale: float, enable_gqa: bool, config: str, site: str
) -> Tensor:
    """``omnisparse.attention`` with a mask (bool or additive), its output only."""
    return ATTENTION(q, k, v, attn_mask, 0.0, False, scale, enable_gqa, config, site, need_lse=False)[0]


@attention_plugin.register_fake
def _attention_plugin_fake(q, k, v, is_causal, scale, enable_gqa, config, site):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@attention_plugin_masked.register_fake
def _attention_plugin_masked_fake(q, k, v, attn_mask, scale, enable_gqa, config, site):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


PLUGIN_OPS = ("omnisparse::attention_plugin", "omnisparse::attention_plugin_masked")


def use_plugin_attention(gm: GraphModule) -> bool:
    """Rewrite ``gm``'s attention op calls into the plugin ops in place; returns whether it changed."""
    changed = False
    for node in list(gm.graph.find_nodes(op="call_function", target=ATTENTION)):
        changed |= _rewrite(gm, node)
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def _rewrite(gm: GraphModule, node: Node) -> bool:
    args = attention_args(node)
    q, k, v, attn_mask, is_causal, scale = (
        args[n] for n in ("q", "k", "v", "attn_mask", "is_causal", "scale")
    )
    outputs = [user for user in node.users if user.users]  # export graphs keep an unused getitem(., 1)
    if not outputs or not all(user.target is operator.getitem and user.args[1] == 0 for user in outputs):
        return False
    if args["window"] is not None or args["softcap"] is not None:
        return False
    if scale is None:
        scale = 1.0 / math.sqrt(_value(q).shape[-1])
    if not isinstance(scale, float):
        return False
    if attn_mask is None:
        target, operands = torch.ops.omnisparse.attention_plugin.default, (q, k, v, is_causal)
    else:
        target, operands = torch.ops.omnisparse.attention_plugin_masked.default, (q, k, v, attn_mask)
    with gm.graph.inserting_before(node):
        plugin = gm.graph.call_function(
            target, (*operands, scale, args["enable_gqa"], args["config"], args["site"])
        )
    plugin.meta.update(outputs[0].meta)
    for user in list(node.users):
        user.replace_all_uses_with(plugin)
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    check = args["mask_check"]
    if isinstance(check, Node) and not check.users:
        gm.graph.erase_node(check)
    return True


def _value(node: Node) -> Tensor:
    return node.meta["val"] if "val" in node.meta else node.meta["example_value"]
