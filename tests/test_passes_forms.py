"""The attention forms of real model code, through the ``omnisparse`` backend in dense mode (issue 19).

Each supported form is a small function or module compiled with the backend (the passes, then
Inductor); the rewritten graph must hold the op and no softmax, every site must be replaced, and
the output must equal eager within fp32 tolerance. Forms the op cannot take yet stay untouched with
their reason; graphs that only resemble attention must not become a site at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import omnicompile
from omnicompile.config import OmniSparseConfig
from omnicompile.passes import PassReport, SiteRecord
from omnicompile.passes.attention_site import attention_args
from omnicompile.passes.replace_eager_attention import NOT_SOFT_CAP_REASON
from tests.attention_cases import Case, make_qkv
from tests.helpers import check_numerics, targets

DENSE = OmniSparseConfig(mode="dense")
OP = torch.ops.omnisparse.attention.default
B, H, S, D = 2, 4, 8, 16
FMIN = torch.finfo(torch.float32).min


@dataclass
class Compiled:
    """What one compiled call gave: the pass reports of its graphs and its output."""

    reports: list[PassReport]
    output: Any

    def sites(self) -> list[SiteRecord]:
        return [site for report in self.reports for site in report.sites]

    def rewritten_targets(self) -> list[Any]:
        return [target for report in self.reports for target in targets(report.graph_module)]


def compile_dense(fn: Callable[..., Any], *args: Any, dynamic: bool = False) -> Compiled:
    """``fn(*args)`` compiled by the omnisparse backend (mode="dense"), with its pass reports."""
    reports: list[PassReport] = []
    backend = omnicompile.backend(DENSE, reports=reports)
    torch._dynamo.reset()
    with torch.no_grad():
        output = torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)(*args)
    return Compiled(reports, output)


def qkv(q_len: int = S, kv_len: int = S) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, H, q_len, D], k and v [B, H, kv_len, D]."""
    return make_qkv(Case(B, H, H, q_len, kv_len, D, "none", seed=19))


def causal_keep(q_len: int = S, kv_len: int = S) -> torch.Tensor:
    """bool [q_len, kv_len], True where kept (bottom-right aligned, as a KV cache makes it)."""
    return torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)


def padding(kv_len: int = S) -> torch.Tensor:
    """A [B, kv_len] attention_mask (1 = token); the second sequence's last 3 keys are padding."""
    mask = torch.ones(B, kv_len, dtype=torch.long)
    mask[1, -3:] = 0
    return mask


def additive_padding(kv_len: int = S) -> torch.Tensor:
    """Padding as an additive [B, 1, 1, kv_len] finfo.min mask, as transformers builds it."""
    return (1.0 - padding(kv_len)[:, None, None, :].float()) * FMIN


def heads_folded(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] -> [B*H, S, D]."""
    return x.reshape(-1, x.shape[-2], x.shape[-1])


# ---- forms that become the op -----------------------------------------------------------------


def bart(q, k, v):
    """BART/MBart: bmm on [B*H, S, D], view to 4-D around the mask and back, eval dropout."""
    q3, k3, v3 = heads_folded(q * D**-0.5), heads_folded(k), heads_folded(v)
    scores = torch.bmm(q3, k3.transpose(1, 2))
    scores = scores.view(B, H, S, S) + additive_padding()
    weights = F.softmax(scores.view(B * H, S, S), dim=-1)
    weights = F.dropout(weights, p=0.1, training=False)
    return torch.bmm(weights, v3).view(B, H, S, D)


class Bloom(torch.nn.Module):
    """BLOOM: ALiBi through ``alibi.baddbmm(batch1=q, batch2=kT, beta, alpha)``, a 4-D causal mask,
    fp32 softmax, ``nn.Dropout`` in eval, ``bmm`` on the weights viewed back to 3-D."""

    def __init__(self, method: bool) -> None:
        super().__init__()
        self.method, self.inv_norm_factor, self.dropout = method, D**-0.5, torch.nn.Dropout(0.1).eval()
        slopes = torch.tensor([2.0 ** -(i + 1) for i in range(H)])
        alibi = slopes[:, None] * torch.arange(S)[None, :]  # [H, S]: slope * key position
        self.register_buffer("alibi", alibi.repeat(B, 1)[:, None, :])  # [B*H, 1, S]

    def forward(self, q, k, v):
        q3, k3, v3 = heads_folded(q), heads_folded(k).transpose(-1, -2), heads_folded(v)
        if self.method:
            scores = self.alibi.baddbmm(batch1=q3, batch2=k3, beta=1.0, alpha=self.inv_norm_factor)
        else:
            scores = torch.baddbmm(self.alibi, q3, k3, beta=1, alpha=self.inv_norm_factor)
        weights = scores.view(B, H, S, -1) + torch.zeros(S, S).masked_fill(~causal_keep(), FMIN)
        probs = self.dropout(F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype))
        return torch.bmm(probs.view(B * H, S, -1), v3)


class Gpt2(torch.nn.Module):
    """GPT-2: ``torch.where`` on a causal buffer slice with a 0-d finfo.min, an additive padding mask,
    ``.type(value.dtype)`` after the softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bias", causal_keep(16, 16)[None, None])

    def forward(self, q, k, v, attention_mask):
        scores = torch.matmul(q, k.transpose(-1, -2)) / (v.size(-1) ** 0.5)
        q_len, kv_len = q.size(-2), k.size(-2)
        causal = self.bias[:, :, kv_len - q_len : kv_len, :kv_len]
        mask_value = torch.full([], torch.finfo(scores.dtype).min, dtype=scores.dtype, device=scores.device)
        scores = torch.where(causal, scores.to(scores.dtype), mask_value) + attention_mask
        weights = F.softmax(scores, dim=-1).type(v.dtype)
        return torch.matmul(F.dropout(weights, p=0.1, training=False), v)


def distilbert(q, k, v, attention_mask):
    """DistilBERT: a [B, S] padding mask expanded to the scores, masked_fill with a 0-d finfo.min."""
    scores = torch.matmul(q / math.sqrt(D), k.transpose(2, 3))
    mask = (attention_mask == 0).view(B, 1, 1, -1).expand_as(scores)
    scores = scores.masked_fill(mask, torch.tensor(torch.finfo(scores.dtype).min))
    return torch.matmul(F.softmax(scores, dim=-1), v)


def t5(q, k, v, position_bias):
    """T5: no scale, ``scores += bias`` in place, ``scores.float().softmax(-1).type_as(scores)``."""
    scores = torch.matmul(q, k.transpose(3, 2))
    scores += position_bias + additive_padding()
    weights = scores.float().softmax(-1).type_as(scores)
    return torch.matmul(weights, v)


def deberta(q, k, v, attention_mask):
    """DeBERTa-v2: kT divided by a 0-d tensor scale, a 3-D relative bias, masked_fill(~mask, min)."""
    q3, k3, v3 = heads_folded(q), heads_folded(k), heads_folded(v)
    scale = torch.sqrt(torch.tensor(q3.size(-1), dtype=torch.float) * 2)
    scores = torch.bmm(q3, k3.transpose(-1, -2) / scale.to(dtype=q3.dtype))
    scores = scores + torch.bmm(q3, k3.flip(1).transpose(-1, -2)) / scale  # a stand-in for c2p + p2c
    scores = scores.view(-1, H, scores.size(-2), scores.size(-1))
    # DeBERTa multiplies in the query padding too; rows masked entirely are the one place where eager
    # (uniform weights) and the op (zeros) differ, so only the keys are padded here.
    keep = (attention_mask[:, None, None, :] * torch.ones(1, 1, S, 1, dtype=torch.long)).bool()
    probs = F.softmax(scores.masked_fill(~keep, torch.finfo(q.dtype).min), dim=-1)
    return torch.bmm(probs.view(-1, probs.size(-2), probs.size(-1)), v3)


def merged_after_a_4d_product(q, k, v, bias):
    """A 4-D product viewed as [B*H, S, S], two 3-D terms added there, bmm with a 3-D v."""
    scores = (q @ k.transpose(-1, -2)).view(B * H, S, S) + bias[:, :1] + bias
    return torch.bmm(scores.softmax(-1), heads_folded(v))


def baddbmm_half_beta(q, k, v):
    """baddbmm with beta 0.5, no views: the mask is half the bias."""
    q3, k3 = heads_folded(q), heads_folded(k)
    return torch.bmm(torch.baddbmm(q3[:, :, :1], q3, k3.mT, beta=0.5).softmax(-1), heads_folded(v))


def tensor_scale_after_product(q, k, v):
    """Scores divided by a 0-d tensor proven constant (``sqrt(tensor(D))``)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / torch.sqrt(torch.tensor(D, dtype=torch.float32))
    return torch.matmul(scores.softmax(-1), v)


def soft_capped(q, k, v):
    """Gemma 2: ``tanh(scores / cap) * cap`` before the mask."""
    scores = torch.matmul(q, k.transpose(2, 3)) * D**-0.5
    scores = torch.tanh(scores / 50.0) * 50.0
    return torch.matmul(F.softmax(scores + additive_padding(), dim=-1, dtype=torch.float32).to(q.dtype), v)


def soft_capped_by_tensor(q, k, v):
    """Gemma 2's three lines, the cap a 0-d tensor (proven constant) and the product first."""
    cap = torch.tensor(2.0)
    scores = torch.matmul(q, k.transpose(2, 3)) * 0.5
    scores = scores / cap
    scores = torch.tanh(scores)
    scores = cap * scores
    return scores.masked_fill(~causal_keep(), float("-inf")).softmax(-1) @ v


FORMS: dict[str, tuple[Callable[..., Any], Callable[[], tuple[torch.Tensor, ...]], str]] = {
    # name: (function or module, inputs, the mask kind the op gets)
    "bart_bmm_views": (bart, qkv, "additive"),
    "bloom_alibi_baddbmm_method": (Bloom(method=True), qkv, "additive"),
    "bloom_alibi_baddbmm_function": (Bloom(method=False), qkv, "additive"),
    "einsum_both_products": (
        lambda q, k, v: torch.einsum(
            "bhqk,bhkd->bhqd", (torch.einsum("bhqd,bhkd->bhqk", q, k) * D**-0.5).softmax(-1), v
        ),
        qkv,
        "none",
    ),
    "einsum_key_transposed_operands_swapped": (
        lambda q, k, v: torch.einsum(
            "bhkd,bhqk->bhqd", v, torch.einsum("bhdk,bhqd->bhqk", k.mT, q).softmax(-1)
        ),
        qkv,
        "none",
    ),
    "einsum_ellipsis": (
        lambda q, k, v: torch.einsum(
            "...qk,...kd->...qd", torch.einsum("...qd,...kd->...qk", q, k).softmax(-1), v
        ),
        qkv,
        "none",
    ),
    "masked_fill_neg_inf_causal": (
        lambda q, k, v: (
            (q @ k.transpose(-1, -2) * 0.25).masked_fill(~causal_keep(), float("-inf")).softmax(-1) @ v
        ),
        qkv,
        "bool",
    ),
    "gpt2_where_causal_buffer": (Gpt2(), lambda: (*qkv(), additive_padding()), "additive"),
    "distilbert_masked_fill_padding": (distilbert, lambda: (*qkv(), padding()), "bool"),
    "t5_bias_in_place_type_as": (t5, lambda: (*qkv(), torch.randn(1, H, S, S)), "additive"),
    "deberta_tensor_scale_on_key": (deberta, lambda: (*qkv(), padding()), "additive"),
    "tensor_scale_proven_constant": (tensor_scale_after_product, qkv, "none"),
    "baddbmm_beta_half_no_views": (baddbmm_half_beta, qkv, "additive"),
    "merged_view_with_3d_terms": (
        merged_after_a_4d_product,
        lambda: (*qkv(), torch.randn(B * H, S, S)),
        "additive",
    ),
    "permuted_key_to_float": (
        lambda q, k, v: torch.matmul((q @ k.permute(0, 1, 3, 2)).softmax(-1).to(torch.float32), v),
        qkv,
        "none",
    ),
    "clone_and_float_casts": (
        lambda q, k, v: (q @ k.transpose(-2, -1)).float().softmax(dim=-1).clone().float() @ v,
        qkv,
        "none",
    ),
    "cross_attention_key_padding": (
        lambda q, k, v: F.dropout((q @ k.mT / 4 + additive_padding(12)).softmax(-1), 0.2, False) @ v,
        lambda: qkv(q_len=5, kv_len=12),
        "additive",
    ),
    "cross_attention_bool_padding_masked_fill": (
        lambda q, k, v: (q @ k.mT).masked_fill(padding(12)[:, None, None, :] == 0, FMIN).softmax(-1) @ v,
        lambda: qkv(q_len=5, kv_len=12),
        "bool",
    ),
    "soft_cap_gemma2": (soft_capped, qkv, "additive"),
    "soft_cap_tensor_cap_lines": (soft_capped_by_tensor, qkv, "bool"),
    "soft_cap_tanh_method_no_mask": (
        lambda q, k, v: ((q @ k.mT / 3.0).tanh() * 3.0).softmax(-1) @ v,
        qkv,
        "none",
    ),
}
# The soft-cap each form's op call must carry (every other form: None).
SOFT_CAPS = {"soft_cap_gemma2": 50.0, "soft_cap_tensor_cap_lines": 2.0, "soft_cap_tanh_method_no_mask": 3.0}


@pytest.mark.parametrize("form", FORMS)
def test_form_becomes_the_op(form: str) -> None:
    fn, inputs, mask_kind = FORMS[form]
    args = inputs()
    compiled = compile_dense(fn, *args)
    found = compiled.rewritten_targets()
    assert found.count(OP) == 1
    assert not {F.softmax, torch.softmax, "softmax"} & set(found), "a softmax is left in the rewritten graph"
    (site,) = compiled.sites()
    assert (site.status, site.pattern, site.reason) == ("replaced", "eager", "")
    assert site.mask == mask_kind
    (op,) = [
        node for report in compiled.reports for node in report.graph_module.graph.nodes if node.target is OP
    ]
    assert attention_args(op)["softcap"] == SOFT_CAPS.get(form)
    (batch, heads, _, _), key_shape = site.shapes[0], site.shapes[1]
    assert batch * heads == B * H and len(key_shape) == 4  # 3-D products without views: heads 1
    with torch.no_grad():
        check_numerics(compiled.output, fn(*args))


# ---- forms left untouched, with the reason --------------------------------------------------


UNTOUCHED: dict[str, tuple[Callable[..., Any], Callable[[], tuple[torch.Tensor, ...]], str]] = {
    "soft_cap_lookalike_caps_differ": (
        lambda q, k, v: (torch.tanh(q @ k.mT / 50.0) * 30.0).softmax(-1) @ v,
        qkv,
        NOT_SOFT_CAP_REASON,
    ),
    "soft_cap_lookalike_tanh_alone": (
        lambda q, k, v: torch.tanh(q @ k.mT / 50.0).softmax(-1) @ v,
        qkv,
        NOT_SOFT_CAP_REASON,
    ),
    "scaled_after_the_soft_cap": (
        lambda q, k, v: (torch.tanh(q @ k.mT / 50.0) * 50.0 * 0.25).softmax(-1) @ v,
        qkv,
        "the scores are scaled after the soft-cap",
    ),
    "tensor_scale_not_constant": (
        lambda q, k, v, scale: ((q @ k.mT) / scale).softmax(-1) @ v,
        lambda: (*qkv(), torch.tensor(4.0)),
        "a tensor not proven constant",
    ),
    "masked_fill_value_that_does_not_mask": (
        lambda q, k, v: (q @ k.mT).masked_fill(~causal_keep(), -1e4).softmax(-1) @ v,
        qkv,
        "fills masked scores with -10000.0, not -inf or finfo.min",
    ),
}


@pytest.mark.parametrize("form", UNTOUCHED)
def test_unsupported_form_stays_with_reason(form: str, caplog: pytest.LogCaptureFixture) -> None:
    fn, inputs, reason = UNTOUCHED[form]
    args = inputs()
    with caplog.at_level("WARNING", logger="omnicompile"):
        compiled = compile_dense(fn, *args)
    assert OP not in compiled.rewritten_targets()
    (site,) = compiled.sites()
    assert site.status == "untouched" and reason in site.reason
    summaries = [r.getMessage() for r in caplog.records if "attention sites rewritten" in r.getMessage()]
    assert len(summaries) == 1 and "0 of 1 attention sites rewritten" in summaries[0]
    assert "see omnicompile.explain" in summaries[0] and f"1x {site.reason}" in summaries[0]
    with torch.no_grad():
        check_numerics(compiled.output, fn(*args))


def test_explain_shows_the_not_a_soft_cap_reason() -> None:
    fn = UNTOUCHED["soft_cap_lookalike_caps_differ"][0]
    torch._dynamo.reset()
    report = omnicompile.explain(fn, *qkv(), config=DENSE, measure=False)
    (site,) = report.sites
    assert site.decision == "untouched" and site.reason == NOT_SOFT_CAP_REASON
    assert "not a logit soft-cap" in str(report)


# ---- graphs that only resemble attention ------------------------------------------------------

NOT_ATTENTION: dict[str, Callable[..., Any]] = {
    "softmax_over_queries": lambda q, k, v: (q @ k.mT).softmax(-2) @ v,
    "einsum_sums_each_operand_apart": lambda q, k, v: torch.einsum("bhqd,bhke->bhqk", q, k).softmax(-1) @ v,
    "weights_as_right_operand": lambda q, k, v: v.mT @ (q @ k.mT).softmax(-1),
    "einsum_contracts_the_queries": lambda q, k, v: torch.einsum(
        "bhqk,bhqd->bhkd", torch.einsum("bhqd,bhkd->bhqk", q, k).softmax(-1), v
    ),
    "mask_added_after_softmax": lambda q, k, v: ((q @ k.mT).softmax(-1) + causal_keep().float()) @ v,
    "weights_masked_after_softmax": lambda q, k, v: (
        (q @ k.mT).softmax(-1).masked_fill(~causal_keep(), 0.0) @ v
    ),
    "softmax_over_the_flattened_scores": lambda q, k, v: (
        torch.bmm(heads_folded(q), heads_folded(k).mT).view(B, H * S * S).softmax(-1).view(B * H, S, S)
        @ heads_folded(v)
    ),
    "scores_times_a_tensor": lambda q, k, v: ((q @ k.mT) * torch.linspace(0, 1, S)).softmax(-1) @ v,
}


@pytest.mark.parametrize("case", NOT_ATTENTION)
def test_lookalike_is_not_rewritten(case: str) -> None:
    fn = NOT_ATTENTION[case]
    args = qkv()
    compiled = compile_dense(fn, *args)
    assert compiled.sites() == [] and OP not in compiled.rewritten_targets()
    with torch.no_grad():
        check_numerics(compiled.output, fn(*args))


# ---- dynamic shapes and the sparse path -------------------------------------------------------


class BartLayer(torch.nn.Module):
    """BART's layout from hidden states: heads a constant (H), batch and length dynamic."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = (
            t.view(batch, length, H, D).transpose(1, 2).reshape(batch * H, length, D) for t in x.chunk(3, -1)
        )
        scores = torch.bmm(q, k.transpose(1, 2)) * D**-0.5
        scores = scores.view(batch, H, length, length) + mask
        weights = F.softmax(scores.view(batch * H, length, length), dim=-1)
        return torch.bmm(weights, v).view(batch, H, length, D)


def test_batched_heads_with_dynamic_shapes() -> None:
    torch.manual_seed(4)
    x, mask = torch.randn(B, 24, 3 * H * D), torch.zeros(24, 24).masked_fill(~causal_keep(24, 24), FMIN)
    compiled = compile_dense(BartLayer(), x, mask, dynamic=True)
    (site,) = compiled.sites()
    assert site.status == "replaced" and isinstance(site.shapes[0][0], str), site
    check_numerics(compiled.output, BartLayer()(x, mask))


class DividedByAttribute(torch.nn.Module):
    """Scores divided by a float attribute: a symbolic value under ``dynamic=True``."""

    def __init__(self) -> None:
        super().__init__()
        self.divisor = D**0.5

    def forward(self, q, k, v):
        return torch.matmul((torch.matmul(q, k.transpose(-1, -2)) / self.divisor).softmax(-1), v)


def test_division_by_a_symbolic_value_stays_with_reason() -> None:
    args = qkv()
    compiled = compile_dense(DividedByAttribute(), *args, dynamic=True)
    (site,) = compiled.sites()
    assert site.status == "untouched" and "divided by a symbolic value" in site.reason
    check_numerics(compiled.output, DividedByAttribute()(*args))


def test_batched_heads_form_runs_sparse() -> None:
    """The bmm form with a causal masked_fill at 64 keys on the sparse path (every block kept: exact)."""
    config = OmniSparseConfig(block_size=16, min_seq_len=16, tau=1.0, query_selection=False)
    torch.manual_seed(5)
    x = torch.randn(B, 64, 3 * H * D)
    mask = torch.zeros(64, 64).masked_fill(~causal_keep(64, 64), FMIN)
    torch._dynamo.reset()
    report = omnicompile.explain(BartLayer(), x, mask, config=config, measure=False)
    (site,) = report.sites
    assert site.decision == "sparse", site.reason
    check_numerics(report.output, BartLayer()(x, mask))
