"""The mask decided at compile time (passes/mask_from_positions.py) and the op's window / mask check.

On transformers' own compiled graphs (Llama and Gemma 3, SDPA and eager attention, with and
without a padding ``attention_mask``, with and without the cache): a causal mask must become
``is_causal=True`` (and a sliding-window one ``window=W``) with its construction gone; a mask built
from an input is checked once per forward (one ``causal_mask_check`` per distinct mask) and the
outputs stay equal to eager. Soundness negatives on hand-built masks: nearly causal, off by one,
banded, with a weak additive value, from an input with one entry changed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx import GraphModule

import omnicompile
from omnicompile.config import OmniSparseConfig
from omnicompile.kernels.masks import allowed_blocks, window_mask
from omnicompile.passes import PassReport, SiteRecord, run_passes
from omnicompile.passes.mask_values import Affine, Pred, aligned, classify
from omnicompile.recording import recording
from tests.helpers import REL_TOL, rel_error

transformers = pytest.importorskip("transformers")

DENSE = OmniSparseConfig(mode="dense")
# Sparse path on every call (min_seq_len below the lengths used) and nothing skipped: equal to dense.
SPARSE_FULL = OmniSparseConfig(block_size=16, min_seq_len=16, tau=1.0, query_selection=False)
OP = torch.ops.omnisparse.attention.default
CHECK = torch.ops.omnisparse.causal_mask_check.default
WINDOW = 16
TOL = REL_TOL[torch.float32]
needs_window_kernels = pytest.mark.skipif(
    "window" not in inspect.signature(allowed_blocks).parameters,
    reason="the kernels do not take window= yet (kernels branch)",
)


def tiny_model(family: str, attn_implementation: str) -> torch.nn.Module:
    """2 layers, hidden 64, 4 query heads, 2 KV heads; Gemma 3: a sliding layer (window 16), a full one."""
    common = dict(
        vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    if family == "llama":
        config = transformers.LlamaConfig(**common)
    else:
        config = transformers.Gemma3TextConfig(
            **common, head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]
        )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation=attn_implementation
    ).eval()


def model_inputs(seq_len: int, padding: int | None, use_cache: bool, batch: int = 2) -> dict[str, Any]:
    """Random tokens; ``padding``: an ``attention_mask`` input whose first row is left-padded by that many."""
    torch.manual_seed(1)
    kwargs: dict[str, Any] = {"input_ids": torch.randint(0, 64, (batch, seq_len)), "use_cache": use_cache}
    if padding is not None:
        attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
        attention_mask[0, :padding] = 0
        kwargs["attention_mask"] = attention_mask
    return kwargs


def compile_and_run(
    fn: Callable[..., Any], config: OmniSparseConfig, *args: Any, dynamic: bool = False, **kwargs: Any
):
    """``fn(*args, **kwargs)`` through Dynamo and `run_passes`, the reports.

    The rewritten graph is run as is.
    """
    reports: list[PassReport] = []

    def backend(gm: GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        reports.append(run_passes(gm, config))
        return reports[-1].graph_module.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(fn, backend=backend, dynamic=dynamic)(*args, **kwargs)
    return out, reports


def sites(reports: list[PassReport]) -> list[SiteRecord]:
    return [site for report in reports for site in report.sites]


def nodes(reports: list[PassReport], target: Any) -> list[torch.fx.Node]:
    return [
        n
        for r in reports
        for n in r.graph_module.graph.nodes
        if n.op == "call_function" and n.target is target
    ]


def logits(out: Any) -> torch.Tensor:
    return out.logits


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_llama_causal_mask_is_proven_and_its_construction_removed(attn_implementation, use_cache):
    model = tiny_model("llama", attn_implementation)
    kwargs = model_inputs(12, None, use_cache)
    out, reports = compile_and_run(model, DENSE, **kwargs)
    assert [(s.status, s.mask, s.window, s.mask_checked) for s in sites(reports)] == [
        ("replaced", "causal", None, False)
    ] * 2
    ops = nodes(reports, OP)
    assert len(ops) == 2 and all(n.args[3] is None and n.args[5] is True for n in ops)
    assert not nodes(reports, CHECK)
    leftover = [
        n.target for r in reports for n in r.graph_module.graph.nodes if n.target in (torch.diff, torch.where)
    ]
    assert not leftover, "the mask construction must be removed"
    with torch.no_grad():
        assert rel_error(logits(out), model(**kwargs).logits) < TOL


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_llama_padding_mask_is_checked_once_per_forward(attn_implementation, use_cache):
    model = tiny_model("llama", attn_implementation)
    for padding, causal in ((0, True), (3, False)):
        kwargs = model_inputs(12, padding, use_cache)
        with recording(measure=False, keep_run=0) as recorder:
            out, reports = compile_and_run(model, DENSE, **kwargs)
        assert [(s.mask, s.mask_checked) for s in sites(reports)] == [
            ("bool" if attn_implementation == "sdpa" else "additive", True)
        ] * 2
        checks = nodes(reports, CHECK)
        assert len(checks) == 1, "one mask feeds every layer: one check"
        assert all(n.args[11] is checks[0] for n in nodes(reports, OP))
        attn_mask, is_causal = recorder.runs[0].inputs[2:4]
        assert (attn_mask is None, is_causal) == (causal, causal), "the check's result decides the path"
        with torch.no_grad():
            assert rel_error(logits(out), model(**kwargs).logits) < TOL


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_gemma3_sliding_and_full_layers_are_proven(attn_implementation):
    model = tiny_model("gemma", attn_implementation)
    kwargs = model_inputs(40, None, use_cache=False)
    out, reports = compile_and_run(model, DENSE, **kwargs)
    assert [(s.mask, s.window, s.mask_checked) for s in sites(reports)] == [
        ("causal", WINDOW, False),
        ("causal", None, False),
    ]
    assert not nodes(reports, CHECK)
    with torch.no_grad():
        assert rel_error(logits(out), model(**kwargs).logits) < TOL


def test_gemma3_with_dynamic_shapes_is_proven():
    model = tiny_model("gemma", "sdpa")
    kwargs = model_inputs(40, None, use_cache=False)
    out, reports = compile_and_run(model, DENSE, dynamic=True, **kwargs)
    assert isinstance(sites(reports)[0].shapes[0][2], str), "the sequence length must be symbolic"
    assert [(s.mask, s.window) for s in sites(reports)] == [("causal", WINDOW), ("causal", None)]
    with torch.no_grad():
        assert rel_error(logits(out), model(**kwargs).logits) < TOL


def test_gemma3_window_longer_than_the_prompt_is_causal():
    model = tiny_model("gemma", "sdpa")
    kwargs = model_inputs(12, None, use_cache=True)
    out, reports = compile_and_run(model, DENSE, **kwargs)
    assert [(s.mask, s.window) for s in sites(reports)] == [("causal", None), ("causal", None)]
    with torch.no_grad():
        assert rel_error(logits(out), model(**kwargs).logits) < TOL


def test_gemma3_padding_checks_each_distinct_mask_once():
    model = tiny_model("gemma", "sdpa")
    kwargs = model_inputs(40, 3, use_cache=False)
    out, reports = compile_and_run(model, DENSE, **kwargs)
    assert all(s.mask_checked for s in sites(reports))
    assert len(nodes(reports, CHECK)) == 2, "the sliding and the full mask: one check each"
    with torch.no_grad():
        assert rel_error(logits(out), model(**kwargs).logits) < TOL


def test_llama_sparse_path_with_proven_causal_mask_equals_eager():
    model = tiny_model("llama", "sdpa")
    kwargs = model_inputs(40, None, use_cache=False)
    with recording(measure=False) as recorder:
        out, reports = compile_and_run(model, SPARSE_FULL, **kwargs)
    assert [s.mask for s in sites(reports)] == ["causal", "causal"]
    assert [run.decision for run in recorder.runs] == ["sparse", "sparse"]
    with torch.no_grad():
        assert rel_error(logits(out), model(**kwargs).logits) < TOL


@needs_window_kernels
def test_gemma3_sparse_path_with_window_equals_eager():
    model = tiny_model("gemma", "sdpa")
    kwargs = model_inputs(40, None, use_cache=False)
    with recording(measure=False) as recorder:
        out, _ = compile_and_run(model, SPARSE_FULL.replace(min_seq_len=WINDOW), **kwargs)
    assert [run.decision for run in recorder.runs] == ["sparse", "sparse"]
    with torch.no_grad():
        assert rel_error(logits(out), model(**kwargs).logits) < TOL


def test_backend_omnisparse_end_to_end_proves_the_mask():
    model = tiny_model("llama", "sdpa")
    kwargs = model_inputs(12, None, use_cache=False)
    reports: list[PassReport] = []
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=omnicompile.backend(DENSE, reports=reports))(**kwargs)
        assert rel_error(out.logits, model(**kwargs).logits) < TOL
    assert [s.mask for s in sites(reports)] == ["causal", "causal"]


# Hand-built masks: q, k, v [1, 2, S, 16]; the mask is built from aranges inside the compiled function.
S = 12


def _qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    return tuple(torch.randn(1, 2, S, 16) for _ in range(3))


def _positions() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(S)[:, None], torch.arange(S)[None, :]


def _ones_written_in_place() -> torch.Tensor:
    mask = torch.ones(S, S, dtype=torch.bool)
    mask[3, :2] = False
    return mask


def _causal_written_through_a_view() -> torch.Tensor:
    mask = (lambda r, c: c <= r)(*_positions())
    mask[None][0, 5].fill_(True)
    return mask


MASKS: dict[str, tuple[Callable[[], torch.Tensor], tuple[str, int | None, bool]]] = {
    # name: (mask builder, expected (record mask, window, checked))
    "causal": (lambda: (lambda r, c: c <= r)(*_positions()), ("causal", None, False)),
    "causal_flipped": (lambda: (lambda r, c: ~(c > r))(*_positions()), ("causal", None, False)),
    "window_4": (lambda: (lambda r, c: (c <= r) & (c > r - 4))(*_positions()), ("causal", 4, False)),
    "window_past_the_end": (
        lambda: (lambda r, c: (c <= r) & (c > r - 100))(*_positions()),
        ("causal", None, False),
    ),
    # transformers 5.17 spells the packed-sequence comparison as a dunder method call.
    "window_4_dunder": (
        lambda: (lambda r, c: (c <= r).__and__(c.__gt__(r - 4)).__and__(r.__eq__(r)))(*_positions()),
        ("causal", 4, False),
    ),
    "all_true": (lambda: torch.ones(S, S, dtype=torch.bool), ("none", None, False)),
    "additive_causal": (
        lambda: torch.where((lambda r, c: c <= r)(*_positions()), 0.0, torch.finfo(torch.float32).min),
        ("causal", None, False),
    ),
    # Negatives: never claimed causal.
    "causal_but_one_entry": (
        lambda: (lambda r, c: (c <= r) | ((r == 2) & (c == 5)))(*_positions()),
        ("bool", None, True),
    ),
    "off_by_one": (lambda: (lambda r, c: c <= r + 1)(*_positions()), ("bool", None, False)),
    "band": (lambda: (lambda r, c: (c - r < 3) & (r - c < 3))(*_positions()), ("bool", None, False)),
    "additive_weak": (
        lambda: torch.where((lambda r, c: c <= r)(*_positions()), 0.0, -1.0),
        ("additive", None, True),
    ),
    # Written in place after it was built: Dynamo keeps using the node, whose operation is not its value.
    "ones_written_in_place": (_ones_written_in_place, ("bool", None, True)),
    "causal_written_through_a_view": (_causal_written_through_a_view, ("bool", None, True)),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_hand_built_masks_are_classified_soundly(name):
    build, expected = MASKS[name]

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=build())

    q, k, v = _qkv()
    out, reports = compile_and_run(attention, DENSE, q, k, v)
    (site,) = sites(reports)
    assert (site.mask, site.window, site.mask_checked) == expected
    assert rel_error(out, F.scaled_dot_product_attention(q, k, v, attn_mask=build())) < TOL


def test_mask_from_an_input_nearly_causal_is_checked_and_runs_masked():
    mask = torch.ones(S, S, dtype=torch.bool).tril()
    mask[7, 3] = False

    def attention(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q, k, v = _qkv()
    with recording(measure=False, keep_run=0) as recorder:
        out, reports = compile_and_run(attention, DENSE, q, k, v, mask)
    assert [s.mask_checked for s in sites(reports)] == [True]
    assert recorder.runs[0].inputs[2] is not None, "a mask that is not causal must be applied"
    assert rel_error(out, attention(q, k, v, mask)) < TOL


def test_causal_mask_check_values():
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    additive = torch.zeros(S, S).masked_fill(~causal, torch.finfo(torch.float32).min)
    nearly = causal.clone()
    nearly[0, 1] = True
    cases = [
        (causal, True), (causal[None, None].expand(2, 1, S, S), True), (additive, True),
        (additive.masked_fill(~causal, float("-inf")), True), (nearly, False),
        (additive.masked_fill(~causal, -1.0), False), (causal[:, :-1], False),
        (torch.ones(S, S, dtype=torch.bool), False),
    ]  # fmt: skip
    for mask, want in cases:
        got = CHECK(mask)
        assert got.dtype == torch.bool and got.device.type == "cpu" and got.dim() == 0
        assert bool(got) is want


def test_op_follows_the_mask_check_without_reading_the_mask():
    q, k, v = _qkv()
    mask = torch.ones(S, S, dtype=torch.bool)  # not causal: only a True check makes the op causal
    cfg = DENSE.to_json()
    checked, _ = OP(q, k, v, mask, 0.0, False, None, False, cfg, "t", None, torch.tensor(True))
    unchecked, _ = OP(q, k, v, mask, 0.0, False, None, False, cfg, "t", None, torch.tensor(False))
    assert rel_error(checked, F.scaled_dot_product_attention(q, k, v, is_causal=True)) < TOL
    assert rel_error(unchecked, F.scaled_dot_product_attention(q, k, v)) < TOL


@pytest.mark.parametrize(
    "config", [DENSE, SPARSE_FULL.replace(min_seq_len=8)], ids=["dense", "window_below_min_seq_len"]
)
def test_op_window_runs_dense_sdpa_with_the_window_mask(config):
    q, k, v = _qkv()
    out, _ = OP(q, k, v, None, 0.0, True, None, False, config.to_json(), "t", 4)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(S, S, 4, "cpu"))
    assert rel_error(out, want) < TOL
    past_the_end, _ = OP(q, k, v, None, 0.0, True, None, False, config.to_json(), "t", S)
    assert rel_error(past_the_end, F.scaled_dot_product_attention(q, k, v, is_causal=True)) < TOL


def test_op_window_gradients_equal_sdpa():
    q, k, v = (t.requires_grad_() for t in _qkv())
    out, _ = OP(q, k, v, None, 0.0, True, None, False, DENSE.to_json(), "t", 4)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(S, S, 4, "cpu"))
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    for got, ref in zip(grads, want_grads):
        assert rel_error(got, ref) < TOL


@pytest.mark.parametrize("masked", [False, True])
def test_op_window_needs_causal_without_mask(masked):
    q, k, v = _qkv()
    mask = torch.ones(S, S, dtype=torch.bool) if masked else None
    with pytest.raises(ValueError, match="window"):
        OP(q, k, v, mask, 0.0, False, None, False, DENSE.to_json(), "t", 4)


# The abstract values themselves, against brute force on a grid of coordinates.
_GRID = [(r, c) for r in range(-6, 7) for c in range(-6, 7)]


def _holds(pred: Pred, r: int, c: int) -> bool:
    y = sum(f * x for f, x in zip(aligned(pred.form, 2), (r, c)))
    return any(lo <= y <= hi for lo, hi in pred.values.intervals)


_affines = st.builds(
    lambda a, b, k: Affine((a, b), k), st.integers(-3, 3), st.integers(-3, 3), st.integers(-5, 5)
)
_ops = st.sampled_from(["le", "lt", "ge", "gt", "eq", "ne"])
_COMPARE = {
    "le": int.__le__,
    "lt": int.__lt__,
    "ge": int.__ge__,
    "gt": int.__gt__,
    "eq": int.__eq__,
    "ne": int.__ne__,
}


def _direct(diff: Affine, op: str, r: int, c: int) -> bool:
    return _COMPARE[op](diff.coefs[0] * r + diff.coefs[1] * c + diff.const, 0)


@settings(max_examples=200, deadline=None)
@given(a=_affines, op_a=_ops, b=_affines, op_b=_ops, combine=st.sampled_from(["and", "or"]))
def test_predicates_equal_brute_force(a, op_a, b, op_b, combine):
    pa, pb = Pred.compare(a, op_a, (7, 7)), Pred.compare(b, op_b, (7, 7))
    both = pa.combine(pb, combine)
    for r, c in _GRID:
        want_a, want_b = _direct(a, op_a, r, c), _direct(b, op_b, r, c)
        assert _holds(pa, r, c) == want_a and _holds(~pa, r, c) == (not want_a)
        if both is not None:  # None: not expressible (never a wrong value)
            assert _holds(both, r, c) == (want_a and want_b if combine == "and" else want_a or want_b)


@settings(max_examples=200, deadline=None)
@given(a=_affines, op=_ops, q_len=st.integers(1, 8), kv_len=st.integers(1, 8))
def test_classify_agrees_with_the_materialised_mask(a, op, q_len, kv_len):
    pred = Pred.compare(a, op, (q_len, kv_len))
    mask = torch.tensor([[_holds(pred, r, c) for c in range(kv_len)] for r in range(q_len)])
    rows, cols = torch.arange(q_len)[:, None], torch.arange(kv_len)[None, :]
    proof = classify(pred, q_len, kv_len)
    if proof == ("causal", None):
        assert torch.equal(mask, cols <= rows)
    elif proof is not None and proof[0] == "window":
        assert proof[1] < q_len and torch.equal(mask, (cols <= rows) & (cols > rows - proof[1]))
    elif proof == ("all", None):
        assert bool(mask.all())
    # A predicate left unproven (None) is checked at run time: slower, never wrong. Completeness is
    # not asserted here: at small sizes some predicates coincide with causal by accident (r - 2c + 1
    # >= 0 at 2 x 2); the spellings models use are proven in the tests above.


def test_explain_shows_the_proven_window_and_the_check():
    def attention(q, k, v, mask):
        r, c = _positions()
        local = F.scaled_dot_product_attention(q, k, v, attn_mask=(c <= r) & (c > r - 4))
        return local + F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    torch._dynamo.reset()
    report = omnicompile.explain(attention, *_qkv(), torch.ones(S, S, dtype=torch.bool).tril(), config=DENSE)
    assert [site.mask for site in report.sites] == ["causal, window 4", "bool (checked)"]


def _gemma3_masks_as_transformers_5_17_records_them(s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full and sliding (window 512) masks of Gemma 3 as Dynamo recorded them under transformers
    5.17 (the GPU image; the code of the graph, names shortened): ``__eq__`` as a method call."""
    position_ids = (torch.arange(s) + 0).unsqueeze(0)
    diff = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    packed = (diff != 1).cumsum(-1)
    batch = torch.arange(1)[:, None, None, None]
    q_idx = (torch.arange(s) + 0)[None, None, :, None]
    kv_idx = (torch.arange(s) + 0)[None, None, None, :]
    same = packed[batch, q_idx].__eq__(packed[batch, kv_idx]).to("cpu")
    full = q_idx.new_ones((), dtype=torch.bool) & (kv_idx <= q_idx).to("cpu") & same
    sliding = (
        q_idx.new_ones((), dtype=torch.bool) & (kv_idx > q_idx - 512).to("cpu") & (kv_idx <= q_idx).to("cpu")
    )
    sliding = q_idx.new_ones((), dtype=torch.bool) & sliding.to("cpu") & same
    return full.expand(1, -1, s, s), sliding.expand(1, -1, s, s)


@pytest.mark.parametrize("dynamic", [False, True])
def test_transformers_5_17_gemma3_masks_are_proven(dynamic):
    """Measured on the GPU image: these masks were checked at run time (the ``__eq__`` spelling was not
    read), so Gemma's sliding layers ran the masked path; they must be proven: causal and window 512."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 600, 16) for _ in range(3))

    def layers(q, k, v):
        full, sliding = _gemma3_masks_as_transformers_5_17_records_them(q.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=full) + F.scaled_dot_product_attention(
            q, k, v, attn_mask=sliding
        )

    out, reports = compile_and_run(layers, DENSE, q, k, v, dynamic=dynamic)
    assert [(s.mask, s.window, s.mask_checked) for s in sites(reports)] == [
        ("causal", None, False),
        ("causal", 512, False),
    ]
    assert rel_error(out, layers(q, k, v)) < TOL
