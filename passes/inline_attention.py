"""Export-time pass: put what each op call will run in its place where that is known at export.

``omnisparse.attention`` decides per call, in Python, between the sparse method and dense attention
(`method.decide`); a package that keeps the op calls back into Python for it (docs/EXPORT.md).
`inline_attention` looks at each op call of a rewritten graph (its example values: shapes, dtypes,
device; its constant arguments) and, where the call's path is already decided, replaces it by that
path, which ``torch.export`` then traces and AOTInductor compiles into the package:

- ``"aten"``: dense attention (``mode="dense"``, or static shapes that `method.decide` sends dense,
  e.g. a key length below ``min_seq_len``): `inlined_attention_call`, traced into aten ops (SDPA);
- ``"triton"``: the sparse method on CUDA with static shapes, no mask and every stage a Triton
  kernel (`method.triton_reason`): the triton op ``omnisparse::sparse_attention``, whose kernels
  AOTInductor compiles into the package;
- ``"masked"``: the sparse method on the CPU with static shapes and no mask: the reference
  estimator and selection, then dense attention under the selection's token mask
  (`inlined_attention_call`: `method.masked_sparse_outputs`, the op's CPU path to fp32 rounding,
  with no data-dependent shape).

Every other call stays the op (``"op"``), with the reason logged once per site: a dynamic length
(the sparse decision against ``min_seq_len`` and the kernels' tiles depend on it), a mask
the passes could not prove (the op reads its ``mask_check`` on the host), a window on CUDA (the
op's Triton band kernel), a soft-cap or lse the dense path computes in query chunks of a dynamic
length. Not in `PASSES`: the ``omnisparse`` backend keeps the op (its per-call logging and
recording). Static shapes are the example values' ints: `capture.export_program` captures every
dim not asked to vary as static.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from omnicompile.config import OmniSparseConfig
from omnicompile.method import AttentionInputs, decide, dense_outputs, masked_sparse_outputs, triton_reason
from omnicompile.ops import check_inputs, effective_window

from .attention_site import ATTENTION, attention_args, set_attention_args
from .node_patterns import example_value

logger = logging.getLogger("omnicompile")

SPARSE_ATTENTION = torch.ops.omnisparse.sparse_attention.default

Route = Literal["aten", "triton", "masked", "op"]


@dataclass(frozen=True)
class InlineRecord:
    """What `inline_attention` did with one op call: ``route`` and why (for ``"op"``: why it stays)."""

    site: str
    route: Route
    reason: str


def inlined_attention_call(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    config: str,
    site: str,
    window: int | None = None,
    mask_check: Tensor | None = None,
    softcap: float | None = None,
    need_lse: bool = True,
) -> tuple[Tensor, Tensor]:
    """An op call whose path `attention_route` decided, as plain torch code (the op's arguments;
    ``site`` and ``mask_check`` unused: a mask that is causal gives the same attention as
    ``is_causal``): (out [B, H, Sq, Dv] in q.dtype, lse float32 [B, H, Sq], zeros unless ``need_lse``).

    The ``"aten"`` route (``mode="dense"``, or static shapes `method.decide` sends dense): dense
    attention (`method.dense_outputs`); the ``"masked"`` route (the sparse decision, static shapes, the
    CPU): `method.masked_sparse_outputs`.
    """
    check_inputs(q, k, v, attn_mask, dropout_p, enable_gqa)
    cfg = OmniSparseConfig.from_json(config)
    if cfg.mode == "dense" or decide(q, k, v, attn_mask, cfg, window).path == "dense":
        return dense_outputs(AttentionInputs(q, k, v, attn_mask, is_causal, scale, window, softcap), need_lse)
    x = AttentionInputs(q, k, v, attn_mask, is_causal, scale, effective_window(window, q.shape[2]), softcap)
    return masked_sparse_outputs(x, cfg, need_lse)


def _static(*tensors: Tensor | None) -> bool:
    return all(isinstance(d, int) for t in tensors if t is not None for d in t.shape)


def attention_route(args: dict[str, Any]) -> tuple[Route, str]:
    """The route of one op call from its arguments (`attention_site.attention_args`), and why."""
    q, k, v = (example_value(args[name]) for name in ("q", "k", "v"))
    mask = example_value(args["attn_mask"])
    if any(t is None for t in (q, k, v)) or (args["attn_mask"] is not None and mask is None):
        return "op", "no example values for its inputs"
    if any(isinstance(args[name], Node) for name in ("scale", "softcap", "window", "is_causal")):
        return "op", "scale, soft-cap, window or causality is a graph value"
    config = OmniSparseConfig.from_json(args["config"])
    static = _static(q, k, v, mask)
    window, softcap = args["window"], args["softcap"]
    dense = "mode='dense'" if config.mode == "dense" else ""
    if static and not dense:
        dense = decide(q, k, v, mask, config, window).reason
    if dense:
        if window is not None and q.device.type == "cuda":
            return "op", "a window on CUDA: the op runs the Triton band kernel"
        if not static and (softcap is not None or args["need_lse"]):
            return "op", "a soft-cap or an lse: dense attention in query chunks of a dynamic length"
        return "aten", dense
    if not static:
        return (
            "op",
            "dynamic shapes: the sparse decision (min_seq_len) and the kernels' tiles need the length",
        )
    if args["attn_mask"] is not None:
        return "op", "an attn_mask the passes did not prove (the op reads its mask_check on the host)"
    if q.device.type != "cuda":
        return "masked", "the sparse method on the CPU, its selection a mask over dense attention"
    x = AttentionInputs(
        q, k, v, None, args["is_causal"], args["scale"], effective_window(window, q.shape[2]), softcap
    )
    reason = triton_reason(x, config)
    if reason is not None:
        return "op", f"not every stage is a Triton kernel: {reason}"
    return "triton", "the sparse method, every stage a Triton kernel"


def inline_attention(gm: GraphModule) -> tuple[InlineRecord, ...]:
    """Replace the op calls of ``gm`` whose path is known (module docstring) in place; one record per
    call, in graph order (calls that stay the op are logged)."""
    records = []
    for node in list(gm.graph.find_nodes(op="call_function", target=ATTENTION)):
        args = attention_args(node)
        route, reason = attention_route(args)
        records.append(InlineRecord(args["site"], route, reason))
        if route == "op":
            logger.info("omnisparse export: site %s stays the Python op: %s", args["site"], reason)
        elif route in ("aten", "masked"):
            set_attention_args(node, mask_check=None)
            node.target = inlined_attention_call
        else:
            window = effective_window(args["window"], example_value(args["q"]).shape[2])
            with gm.graph.inserting_before(node):
                call = gm.graph.call_function(
                    SPARSE_ATTENTION,
                    (args["q"], args["k"], args["v"], args["is_causal"], args["scale"], args["config"]),
                    {"window": window, "softcap": args["softcap"]},
                )
            call.meta = dict(node.meta)
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)
        if route != "op" and isinstance(args["mask_check"], Node) and not args["mask_check"].users:
            gm.graph.erase_node(args["mask_check"])  # a check only inlined calls read
    if any(record.route != "op" for record in records):
        gm.recompile()
    return tuple(records)
