"""The step both rewrite passes share: check an attention site, record it, put the op in its place.

A pass finds a site and describes it as an `AttentionCall` (SDPA's arguments as the graph holds
them); `rewrite_site` folds ``repeat_kv`` into ``enable_gqa``, decides whether the op can take the
call (constant flags, example values present, the op's own `check_inputs` on the fake tensors),
appends a `SiteRecord` and, when supported, inserts::

    attention = torch.ops.omnisparse.attention.default(q, k, v, attn_mask, dropout_p, is_causal,
                                                       scale, enable_gqa, config_json, site, None, None,
                                                       softcap, False)
    out = operator.getitem(attention, 0)

before the site's node (`insert_call`: every inserted node gets its example value) and moves every
use of that node to ``out`` (the op's arguments always all positional: `attention_args` and
`set_attention_args` read and change them by name). The node itself and the pattern feeding it
become dead; the cleanup removes them.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from omnicompile.ops import autocast_inputs, check_inputs

from .node_patterns import example_value, is_number, is_scalar_value, known_equal
from .repeat_kv import repeat_kv_source
from .site_record import MaskKind, PassContext, Pattern, Shape, SiteRecord

_PROVENANCE_META = ("stack_trace", "nn_module_stack")
ATTENTION = torch.ops.omnisparse.attention.default
_ATTENTION_PARAMS = tuple(argument.name for argument in ATTENTION._schema.arguments)
_ATTENTION_DEFAULTS = {
    argument.name: argument.default_value
    for argument in ATTENTION._schema.arguments
    if argument.has_default_value()
}


def attention_args(node: Node) -> dict[str, Any]:
    """The arguments of an ``omnisparse.attention`` node by schema name, defaults filled in."""
    return {**_ATTENTION_DEFAULTS, **dict(zip(_ATTENTION_PARAMS, node.args)), **node.kwargs}


def set_attention_args(node: Node, **changes: Any) -> None:
    """Replace some arguments of an ``omnisparse.attention`` node (all then positional)."""
    args = {**attention_args(node), **changes}
    node.args, node.kwargs = tuple(args[name] for name in _ATTENTION_PARAMS), {}


@dataclass(frozen=True)
class AttentionCall:
    """An attention site's arguments in SDPA's order: graph nodes, or constants as the graph holds them;
    ``softcap``: the logit soft-cap the site applies to its scaled scores (a number or a symbolic
    float's node), or None."""

    query: Node
    key: Node
    value: Node
    attn_mask: Node | None
    dropout_p: Any
    is_causal: Any
    scale: Any
    enable_gqa: Any
    softcap: Any = None

    def tensors(self) -> tuple[Node, ...]:
        """The tensor operands: q, k, v and the mask when there is one."""
        return (self.query, self.key, self.value) + (() if self.attn_mask is None else (self.attn_mask,))


def fold_repeat_kv(call: AttentionCall) -> AttentionCall:
    """``call`` on the KV heads themselves, ``enable_gqa=True``, when k and v are both ``repeat_kv(·, n)``."""
    key, value = repeat_kv_source(call.key), repeat_kv_source(call.value)
    if key is None or value is None or key[1] != value[1]:
        return call
    return dataclasses.replace(call, key=key[0], value=value[0], enable_gqa=True)


def unsupported_reason(call: AttentionCall) -> str | None:
    """Why the op cannot take ``call`` (None when it can)."""
    constants = (
        ("dropout_p", call.dropout_p, is_number(call.dropout_p)),
        ("is_causal", call.is_causal, isinstance(call.is_causal, bool)),
        ("scale", call.scale, call.scale is None or is_scalar_value(call.scale)),
        ("enable_gqa", call.enable_gqa, isinstance(call.enable_gqa, bool)),
        ("softcap", call.softcap, call.softcap is None or is_scalar_value(call.softcap)),
    )
    for name, value, ok in constants:
        if not ok:
            return f"unsupported {name} argument {value!r} (not a constant of the op's type)"
    missing = [str(node) for node in call.tensors() if example_value(node) is None]
    if missing:
        return f"no example value recorded for {', '.join(missing)}"
    if call.is_causal and call.attn_mask is not None:
        return "is_causal=True together with an attn_mask (SDPA rejects it)"
    q, k, v = (example_value(n) for n in (call.query, call.key, call.value))
    mask = example_value(call.attn_mask) if call.attn_mask is not None else None
    q, k, v, mask = autocast_inputs(q, k, v, mask)  # the pass runs under the caller's autocast state
    try:
        check_inputs(q, k, v, mask, call.dropout_p, call.enable_gqa)
    except ValueError as error:
        return str(error)
    return None


def rewrite_site(
    gm: GraphModule,
    ctx: PassContext,
    site: Node,
    pattern: Pattern,
    call: AttentionCall,
    blocker: str | None = None,
    flatten_heads: bool = False,
) -> bool:
    """Record the site and, unless ``blocker`` or `unsupported_reason` says why not, replace it by the op.

    ``site`` is the node whose value the attention produces; ``blocker`` is a pattern-specific reason
    found by the pass (e.g. an intermediate used elsewhere); ``flatten_heads``: the site is 3-D
    ``[B*H, Sq, Dv]``, the op's ``[B, H, Sq, Dv]`` output flattened to it. Returns whether the graph changed.
    """
    call = fold_repeat_kv(call)
    reason = blocker or unsupported_reason(call)
    name = ctx.site_prefix + site.name
    ctx.sites.append(
        SiteRecord(
            site=name,
            pattern=pattern,
            shapes=tuple(_shape(node) for node in (call.query, call.key, call.value)),
            mask=_mask_kind(call),
            gqa=_has_gqa(call),
            status="untouched" if reason else "replaced",
            reason=reason or "",
        )
    )
    if reason:
        return False
    _insert_op(gm, site, call, ctx.config_json, name, flatten_heads)
    return True


def _insert_op(
    gm: GraphModule, site: Node, call: AttentionCall, config_json: str, name: str, flatten_heads: bool
) -> None:
    scale = float(call.scale) if is_number(call.scale) else call.scale
    args = (
        call.query,
        call.key,
        call.value,
        call.attn_mask,
        float(call.dropout_p),
        call.is_causal,
        scale,
        call.enable_gqa,
        config_json,
        name,
        None,
        None,
        call.softcap,
        False,  # need_lse: the site's attention has no lse, so no use of it
    )
    out = insert_call(gm, site, operator.getitem, (insert_call(gm, site, ATTENTION, args), 0))
    if flatten_heads:
        out = insert_call(gm, site, torch.flatten, (out, 0, 1))
    site.replace_all_uses_with(out)


def insert_call(
    gm: GraphModule,
    before: Node,
    target: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
) -> Node:
    """Insert ``target(*args, **kwargs)`` before ``before``, with its example value (computed on the
    arguments' example values in their own fake mode) and ``before``'s provenance (stack trace, module)."""
    kwargs = kwargs or {}
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(target, args, kwargs)
    fake_args, fake_kwargs = map_arg((args, kwargs), lambda arg: arg.meta["example_value"])
    tensors = [leaf for leaf in pytree.tree_leaves(fake_args) if isinstance(leaf, FakeTensor)]
    # The example values' own mode: Dynamo hands the backend a different one in its tracing context.
    with tensors[0].fake_mode:
        node.meta["example_value"] = target(*fake_args, **fake_kwargs)
    node.meta.update({key: before.meta[key] for key in _PROVENANCE_META if key in before.meta})
    return node


def _shape(node: Node) -> Shape:
    value = example_value(node)
    if value is None:
        return ()
    return tuple(dim if isinstance(dim, int) else str(dim) for dim in value.shape)


def _mask_kind(call: AttentionCall) -> MaskKind:
    if call.is_causal is True:
        return "causal"
    if call.attn_mask is None:
        return "none"
    mask = example_value(call.attn_mask)
    return "bool" if mask is not None and mask.dtype == torch.bool else "additive"


def _has_gqa(call: AttentionCall) -> bool:
    q, k = example_value(call.query), example_value(call.key)
    if q is None or k is None or q.dim() < 3 or k.dim() < 3:
        return False
    return not known_equal(q.shape[-3], k.shape[-3])
