"""Tests for the attention-rewrite passes (`omnicompile.passes`).

Every case compiles a small function with a test backend that runs `run_passes` and executes the
rewritten graph as is (the op in mode="dense"), then checks the ops left in the graph, the site
records, that the input graph was not modified, and that the output equals the uncompiled function.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.debugging import aot_eager
from torch.fx import GraphModule

import omnicompile.ops  # noqa: F401  (registers torch.ops.omnisparse.attention)
from omnicompile.config import OmniSparseConfig
from omnicompile.passes import PassReport, run_passes
from omnicompile.passes.attention_site import attention_args
from tests.helpers import check_numerics, targets

DENSE = OmniSparseConfig(mode="dense")
OP = torch.ops.omnisparse.attention.default
SDPA = F.scaled_dot_product_attention
B, H, H_KV, S, D = 2, 4, 2, 8, 16


@dataclass
class Captured:
    """One compiled graph: the Dynamo graph, its code before the passes, the report, the output."""

    original: GraphModule
    original_code: str
    report: PassReport
    output: Any


def capture(
    fn: Callable[..., Any], *args: Any, dynamic: bool = False, lower: Callable | None = None
) -> Captured:
    """Compile ``fn`` with a backend running `run_passes`; ``lower`` (default: none) compiles the result.

    Dynamo may restart and compile again (AOT autograd specialises a symbolic float): the last graph counts.
    """
    seen: list[tuple[GraphModule, str, PassReport]] = []

    def backend(gm: GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        code = gm.code
        report = run_passes(gm, DENSE)
        seen.append((gm, code, report))
        return lower(report.graph_module, example_inputs) if lower else report.graph_module.forward

    torch._dynamo.reset()
    output = torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)(*args)
    gm, code, report = seen[-1]
    return Captured(gm, code, report, output)


def check_graph(captured: Captured, *, replaced: int, absent: tuple[Any, ...] = ()) -> None:
    """``replaced`` op calls whose site and config arguments match the records; ``absent`` ops gone."""
    gm, sites = captured.report.graph_module, captured.report.sites
    found = targets(gm)
    assert found.count(OP) == replaced
    for target in absent:
        assert target not in found, f"{target} left in the rewritten graph"
    ops = [node for node in gm.graph.nodes if node.target is OP]
    assert sorted(op.args[9] for op in ops) == sorted(s.site for s in sites if s.status == "replaced")
    assert all(op.args[8] == DENSE.to_json() for op in ops)
    assert all(attention_args(op)["need_lse"] is False for op in ops)  # no site reads the lse
    assert captured.report.changed == (replaced > 0)
    assert captured.original.code == captured.original_code, "run_passes modified its input graph"
    assert OP not in targets(captured.original)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' repeat_kv."""
    batch, heads, seq, dim = x.shape
    return x[:, :, None, :, :].expand(batch, heads, n_rep, seq, dim).reshape(batch, heads * n_rep, seq, dim)


def qkv(dtype: torch.dtype = torch.float32, kv_heads: int = H_KV) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    return tuple(torch.randn(B, heads, S, D, dtype=dtype) for heads in (H, kv_heads, kv_heads))


def bool_mask() -> torch.Tensor:
    """Causal and left-padded (first sequence starts at position 2), [B, 1, S, S]."""
    keep = torch.ones(S, S, dtype=torch.bool).tril().expand(B, 1, S, S).clone()
    keep[0, :, :, :2] = False
    keep[0, :, :2, :2] = torch.eye(2, dtype=torch.bool)
    return keep


def additive_mask(dtype: torch.dtype = torch.float32, extra_keys: int = 0) -> torch.Tensor:
    """Causal additive mask [B, 1, S, S + extra_keys] (min value where masked), as transformers builds it."""
    keep = torch.ones(S, S + extra_keys, dtype=torch.bool).tril()
    mask = torch.zeros(S, S + extra_keys, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
    return mask.expand(B, 1, S, S + extra_keys)


# ---- scaled_dot_product_attention -------------------------------------------------------------

SDPA_CASES = {
    "transformers_keywords": (
        lambda q, k, v, m: SDPA(
            q, k, v, attn_mask=None, dropout_p=0.0, scale=0.3, is_causal=True, enable_gqa=True
        ),
        "causal",
    ),
    "positional_repeat_kv": (
        lambda q, k, v, m: SDPA(q, repeat_kv(k, 2), repeat_kv(v, 2), None, 0.0, True),
        "causal",
    ),
    "c_nn_positional_scale_keyword": (
        lambda q, k, v, m: torch._C._nn.scaled_dot_product_attention(
            q, k, v, None, 0.0, False, scale=0.2, enable_gqa=True
        ),
        "none",
    ),
    "bool_mask_repeat_kv": (
        lambda q, k, v, m: SDPA(
            q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=m, dropout_p=0.0, scale=0.25, is_causal=False
        ),
        "bool",
    ),
    "additive_mask_2d": (
        lambda q, k, v, m: SDPA(q, k, v, m[0, 0].float().log(), enable_gqa=True),
        "additive",
    ),
}


@pytest.mark.parametrize("case", SDPA_CASES)
def test_sdpa_call_forms_are_replaced(case: str) -> None:
    fn, mask_kind = SDPA_CASES[case]
    args = (*qkv(), bool_mask())
    captured = capture(fn, *args)
    check_graph(
        captured, replaced=1, absent=(SDPA, torch._C._nn.scaled_dot_product_attention, "expand", "reshape")
    )
    (site,) = captured.report.sites
    assert (site.status, site.mask, site.gqa, site.pattern) == ("replaced", mask_kind, True, "sdpa")
    assert site.shapes == ((B, H, S, D), (B, H_KV, S, D), (B, H_KV, S, D))
    check_numerics(captured.output, fn(*args))


SDPA_UNTOUCHED = {
    "training_dropout": (
        lambda q, k, v, m: SDPA(q, k, v, dropout_p=0.1, enable_gqa=True),
        "dropout_p must be 0",
    ),
    "three_dim": (lambda q, k, v, m: SDPA(q[:, 0], k[:, 0], v[:, 0]), "must be 4-D"),
    "learnable_mask": (lambda q, k, v, m: SDPA(q, k, v, attn_mask=m, enable_gqa=True), "learnable attn_mask"),
}


@pytest.mark.parametrize("case", SDPA_UNTOUCHED)
def test_unsupported_sdpa_stays_with_reason(case: str) -> None:
    fn, reason = SDPA_UNTOUCHED[case]
    args = (*qkv(), torch.zeros(S, S, requires_grad=True))
    torch.manual_seed(1)
    captured = capture(fn, *args)
    check_graph(captured, replaced=0)
    assert SDPA in targets(captured.report.graph_module)
    (site,) = captured.report.sites
    assert site.status == "untouched" and reason in site.reason
    torch.manual_seed(1)
    check_numerics(captured.output, fn(*args))


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda sdpa: sdpa.update_kwarg("is_causal", True), "is_causal=True together with an attn_mask"),
        (lambda sdpa: sdpa.args[0].meta.pop("example_value"), "no example value recorded for l_q_"),
        (lambda sdpa: sdpa.update_kwarg("scale", torch.tensor(0.5)), "unsupported scale argument"),
    ],
    ids=["causal_and_mask", "no_example_value", "tensor_scale"],
)
def test_sdpa_reasons_dynamo_cannot_produce(edit: Callable[[torch.fx.Node], Any], reason: str) -> None:
    graphs: list[GraphModule] = []

    def keep_graph(gm: GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(lambda q, k, v, m: SDPA(q, k, v, attn_mask=m), backend=keep_graph)(
        *qkv(kv_heads=H), bool_mask()
    )
    (gm,) = graphs
    (sdpa,) = [node for node in gm.graph.nodes if node.target is SDPA]
    edit(sdpa)
    report = run_passes(gm, DENSE)
    assert not report.changed and OP not in targets(report.graph_module)
    (site,) = report.sites
    assert site.status == "untouched" and reason in site.reason


# ---- hand-written attention -------------------------------------------------------------------


def transformers_eager(q, k, v, mask):
    """transformers' eager_attention_forward: sliced additive mask, fp32 softmax, eval dropout, repeat_kv."""
    key, value = repeat_kv(k, 2), repeat_kv(v, 2)
    weights = torch.matmul(q, key.transpose(2, 3)) * D**-0.5
    weights = weights + mask[:, :, :, : key.shape[-2]]
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = F.dropout(weights, p=0.1, training=False)
    return torch.matmul(weights, value)


EAGER_CASES = {
    "transformers_eager": (transformers_eager, "additive", True),
    "div_scale_operators": (
        lambda q, k, v, m: (
            (q @ repeat_kv(k, 2).transpose(-2, -1) / math.sqrt(D)).softmax(-1) @ repeat_kv(v, 2)
        ),
        "none",
        True,
    ),
    "scaled_query_no_gqa": (
        lambda q, k, v, m: torch.matmul(q[:, :H_KV] * D**-0.5, k.transpose(-1, -2)).softmax(dim=-1).matmul(v),
        "none",
        False,
    ),
    "mask_first_method_calls": (
        lambda q, k, v, m: (
            (m + q[:, :H_KV].matmul(k.transpose(3, 2)).mul(0.25).div(2.0))
            .float()
            .softmax(-1)
            .to(q.dtype)
            .matmul(v)
        ),
        "additive",
        False,
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", EAGER_CASES)
def test_hand_written_attention_is_replaced(case: str, dtype: torch.dtype) -> None:
    fn, mask_kind, gqa = EAGER_CASES[case]
    args = (*qkv(dtype), additive_mask(dtype, extra_keys=3))
    if case == "mask_first_method_calls":
        args = (*args[:3], additive_mask(dtype))
    captured = capture(fn, *args)
    absent = (F.softmax, "softmax", torch.matmul, operator.matmul, "matmul", "expand", F.dropout)
    check_graph(captured, replaced=1, absent=absent)
    (site,) = captured.report.sites
    assert (site.status, site.mask, site.gqa, site.pattern) == ("replaced", mask_kind, gqa, "eager")
    check_numerics(captured.output, fn(*args))


def returns_weights(q, k, v, mask):
    weights = (torch.matmul(q, k.transpose(2, 3)) * 0.25).softmax(-1)
    return torch.matmul(weights, v), weights


EAGER_UNTOUCHED = {
    "weights_returned": (returns_weights, "intermediate weights is also used outside the attention"),
    "training_dropout": (
        lambda q, k, v, m: F.dropout((q @ k.transpose(-2, -1)).softmax(-1), p=0.1, training=True) @ v,
        "dropout p=0.1 in training mode",
    ),
    "bool_mask_added": (
        lambda q, k, v, m: (q @ k.transpose(-2, -1) + (m == 0)).softmax(-1) @ v,
        "torch.bool, not an additive float mask",
    ),
}


@pytest.mark.parametrize("case", EAGER_UNTOUCHED)
def test_unsupported_hand_written_attention_stays_with_reason(case: str) -> None:
    fn, reason = EAGER_UNTOUCHED[case]
    args = (*qkv(kv_heads=H), additive_mask())
    torch.manual_seed(1)
    captured = capture(fn, *args)
    check_graph(captured, replaced=0)
    assert "softmax" in targets(captured.report.graph_module)
    (site,) = captured.report.sites
    assert site.status == "untouched" and reason in site.reason
    torch.manual_seed(1)
    reference = fn(*args)
    outputs = captured.output if isinstance(captured.output, tuple) else (captured.output,)
    for out, ref in zip(outputs, reference if isinstance(reference, tuple) else (reference,)):
        check_numerics(out, ref)


@pytest.mark.parametrize(
    "fn",
    [
        lambda q, k, v, m: ((q @ k.transpose(-2, -1) + m) * 0.25).softmax(-1) @ v,  # the mask is scaled too
        lambda q, k, v, m: (q @ k.transpose(-2, -1)).softmax(1) @ v,  # softmax over the heads
        lambda q, k, v, m: (q @ k.transpose(-2, -1)).softmax(-1).sum(),  # no value matmul
    ],
    ids=["scaled_mask", "softmax_not_last_dim", "no_value_matmul"],
)
def test_non_attention_is_not_a_site(fn: Callable[..., Any]) -> None:
    captured = capture(fn, *qkv(kv_heads=H), additive_mask())
    assert captured.report.sites == ()
    assert captured.report.graph_module is not captured.original
    # The softmax over heads only moves to the last dim (`softmax_last_dim`); nothing else changes.
    moved = captured.report.changed
    assert moved == (captured.original_code.count("softmax(1") == 1)
    assert (captured.report.graph_module.code == captured.original_code) != moved


# ---- run_passes as a whole --------------------------------------------------------------------


def test_cleanup_keeps_unused_in_place_ops() -> None:
    """Dead-code elimination after a rewrite must not drop an in-place op whose result is unused."""

    def fn(q, k, v, counter):
        counter.add_(1)
        return SDPA(q, k, v, is_causal=True, enable_gqa=True)

    counter = torch.zeros(())
    captured = capture(fn, *qkv(), counter)
    check_graph(captured, replaced=1, absent=(SDPA,))
    assert "add_" in targets(captured.report.graph_module)
    assert counter.item() == 1


class ScaledAttention(torch.nn.Module):
    """Hand-written GQA attention whose scale is a float attribute (symbolic under dynamic=True)."""

    def __init__(self) -> None:
        super().__init__()
        self.scaling = D**-0.5

    def forward(self, q, k, v):
        weights = torch.matmul(q, repeat_kv(k, 2).transpose(2, 3)) * self.scaling
        return torch.matmul(weights.softmax(-1), repeat_kv(v, 2))


def test_dynamic_shapes_and_lowering_through_aot_autograd() -> None:
    """Symbolic sizes are recorded by name, a symbolic scale is passed on, and AOT autograd takes the copy."""
    module, args = ScaledAttention(), qkv()
    captured = capture(module, *args, dynamic=True)
    check_graph(captured, replaced=1, absent=("softmax",))
    (site,) = captured.report.sites
    assert site.gqa and any(isinstance(dim, str) for dim in site.shapes[0])
    (op,) = [node for node in captured.report.graph_module.graph.nodes if node.target is OP]
    assert isinstance(op.args[6], torch.fx.Node), "the symbolic scale should reach the op as a graph value"
    lowered = capture(module, *args, dynamic=True, lower=aot_eager)
    check_graph(lowered, replaced=1, absent=("softmax",))
    check_numerics(lowered.output, module(*args))


def test_site_names_are_unique_and_stable() -> None:
    def two_layers(q, k, v, mask):
        hidden = SDPA(q, k, v, is_causal=True, enable_gqa=True)
        return transformers_eager(hidden, k, v, mask) + SDPA(hidden, k, v, enable_gqa=True)

    args = (*qkv(), additive_mask())
    first, second = capture(two_layers, *args), capture(two_layers, *args)
    check_graph(first, replaced=3, absent=(SDPA, "softmax"))
    names = [site.site for site in first.report.sites]
    assert len(set(names)) == 3 and names == [site.site for site in second.report.sites]
    assert [site.pattern for site in first.report.sites] == ["sdpa", "sdpa", "eager"]
    check_numerics(first.output, two_layers(*args))


def test_unbindable_sdpa_site_carries_the_prefix():
    """An SDPA call whose arguments do not fit the signature is recorded untouched, named like every
    other site (prefix + node name)."""
    graph = torch.fx.Graph()
    q, k, v = (graph.placeholder(name) for name in "qkv")
    graph.output(graph.call_function(SDPA, (q, k, v), {"not_an_argument": 1}))
    report = run_passes(GraphModule(torch.nn.Module(), graph), DENSE, site_prefix="g7.")
    (site,) = report.sites
    assert site.status == "untouched" and site.site.startswith("g7.") and "do not fit" in site.reason
