"""Pass: decide each attention op's mask once, at compile time, from the positions that build it.

Under torch.compile transformers materialises its mask (bool [B or 1, 1, S, S] for SDPA, additive
``finfo.min`` for eager attention) and feeds it to every layer. For each ``omnisparse.attention``
call with an ``attn_mask``, `MaskInterpreter` evaluates the mask's subgraph and `classify` proves
what it is:

- causal: ``attn_mask=None, is_causal=True``;
- causal with a sliding window W (``r - W < c <= r``, Gemma 3's local layers): also ``window=W``;
- keeps everything: ``attn_mask=None``;
- another function of positions: unchanged;
- unknown (e.g. built from a padding ``attention_mask`` input): one ``omnisparse::causal_mask_check``
  per distinct mask node, inserted before the first op on it, whose result (a 0-d bool on the CPU)
  every call on that mask gets as ``mask_check`` (a mask written in place: one check per op); the
  op then runs ``is_causal=True`` when it is True. No check is inserted where the query and key
  lengths are known to differ (the mask cannot be causal then). A mask written in place after it
  was built (``mask[i] = v``, ``mask.fill_(v)``, through a view too) is unknown.

The site records follow (``mask``, ``window``, ``mask_checked``). A proven mask's construction is then
dead and the cleanup removes it (the interpreter's operations are all pure).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from omnicompile import ops  # noqa: F401  (registers torch.ops.omnisparse.causal_mask_check)

from .attention_site import ATTENTION, attention_args, set_attention_args
from .mask_interpreter import MaskInterpreter, written_in_place
from .mask_values import classify
from .node_patterns import example_value
from .site_record import PassContext

CAUSAL_MASK_CHECK = torch.ops.omnisparse.causal_mask_check.default


def mask_from_positions(gm: GraphModule, ctx: PassContext) -> bool:
    """Replace proven masks and check unknown ones in ``gm`` in place; returns whether it changed."""
    interpreter = MaskInterpreter()
    checks: dict[tuple[Node, Node | None], Node] = {}
    changed = False
    for node in list(gm.graph.find_nodes(op="call_function", target=ATTENTION)):
        args = attention_args(node)
        mask = args["attn_mask"]
        if not isinstance(mask, Node) or args["mask_check"] is not None:
            continue
        q_len, kv_len = example_value(args["q"]).shape[2], example_value(args["k"]).shape[2]
        proof = classify(interpreter.value(mask), q_len, kv_len)
        changes: dict[str, Any]
        if proof is None:
            if statically_known_true(q_len != kv_len):
                continue
            # Checked right before the op: the mask may be written in place after it was built
            # (then every op checks it itself, as the writes may lie between them).
            key = (mask, node) if written_in_place(mask) else (mask, None)
            if key not in checks:
                checks[key] = _insert_check(gm, mask, node)
            changes = {"mask_check": checks[key]}
        elif proof[0] == "causal":
            changes = {"attn_mask": None, "is_causal": True}
        elif proof[0] == "window":
            changes = {"attn_mask": None, "is_causal": True, "window": proof[1]}
        elif proof[0] == "all":
            changes = {"attn_mask": None}
        else:
            continue
        set_attention_args(node, **changes)
        _update_record(ctx, args["site"], changes)
        changed = True
    return changed


def _insert_check(gm: GraphModule, mask: Node, op: Node) -> Node:
    with gm.graph.inserting_before(op):
        check = gm.graph.call_function(CAUSAL_MASK_CHECK, (mask,))
    fake_mask = example_value(mask)
    with fake_mask.fake_mode:
        check.meta["example_value"] = CAUSAL_MASK_CHECK(fake_mask)
    return check


def _update_record(ctx: PassContext, site: str, changes: dict[str, Any]) -> None:
    for i, record in enumerate(ctx.sites):
        if record.site == site and record.status == "replaced":
            if "mask_check" in changes:
                ctx.sites[i] = dataclasses.replace(record, mask_checked=True)
            else:
                mask = "causal" if changes.get("is_causal") else "none"
                ctx.sites[i] = dataclasses.replace(record, mask=mask, window=changes.get("window"))
