"""The passes on the Dynamo graphs of small transformers models (Llama, Qwen2: SDPA and eager
attention; GPT-2, BLOOM, T5, DeBERTa-v2, Gemma 2: their own eager attention forms).

Every attention layer must become one ``omnisparse.attention`` call (GQA folded into ``enable_gqa``),
and the rewritten graph, run with the op in mode="dense", must give the model's output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch.fx import GraphModule

import omnicompile.ops  # noqa: F401  (registers torch.ops.omnisparse.attention)
from omnicompile.config import OmniSparseConfig
from omnicompile.passes import PassReport, SiteRecord, run_passes
from tests.helpers import REL_TOL, rel_error, targets

transformers = pytest.importorskip("transformers")

DENSE = OmniSparseConfig(mode="dense")
OP = torch.ops.omnisparse.attention.default
LAYERS = 2
CONFIGS = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}


def tiny_model(family: str, attn_implementation: str) -> torch.nn.Module:
    """2 layers, hidden 64, 4 query heads, 2 KV heads; random weights, eval mode."""
    config = CONFIGS[family](
        vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def inputs() -> dict[str, torch.Tensor]:
    """Two sequences of 12 tokens, the first left-padded by 3."""
    torch.manual_seed(1)
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[0, :3] = 0
    return {"input_ids": torch.randint(0, 64, (2, 12)), "attention_mask": attention_mask}


@dataclass
class Compiled:
    """Every graph Dynamo compiled for one call (a graph break makes several), and the call's output."""

    originals: list[GraphModule] = field(default_factory=list)
    reports: list[PassReport] = field(default_factory=list)
    output: Any = None

    def original_targets(self) -> list[Any]:
        return [target for gm in self.originals for target in targets(gm)]

    def rewritten_targets(self) -> list[Any]:
        return [target for report in self.reports for target in targets(report.graph_module)]

    def sites(self) -> list[SiteRecord]:
        return [site for report in self.reports for site in report.sites]


def compile_with_passes(model: torch.nn.Module, dynamic: bool | None = None, **kwargs: Any) -> Compiled:
    """Run ``model(**kwargs)`` compiled by a backend that runs `run_passes` and executes the result."""
    compiled = Compiled()

    def backend(gm: GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        compiled.originals.append(gm)
        compiled.reports.append(run_passes(gm, DENSE))
        return compiled.reports[-1].graph_module.forward

    torch._dynamo.reset()
    with torch.no_grad():
        compiled.output = torch.compile(model, backend=backend, dynamic=dynamic)(**kwargs)
    return compiled


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_attention_layer_becomes_the_op(family: str, attn_implementation: str) -> None:
    model = tiny_model(family, attn_implementation)
    compiled = compile_with_passes(model, **inputs())
    found, original = compiled.rewritten_targets(), compiled.original_targets()
    assert found.count(OP) == LAYERS
    for target in (torch.nn.functional.scaled_dot_product_attention, torch.nn.functional.softmax):
        assert target not in found, f"{target} left in the rewritten graph"
    assert original.count("expand") - found.count("expand") == 2 * LAYERS, "repeat_kv should be folded away"
    sites = compiled.sites()
    assert len(sites) == LAYERS
    for site in sites:
        assert (site.status, site.gqa, site.pattern) == ("replaced", True, attn_implementation)
        assert site.mask != "none", "a causal model's attention must carry causality"
        assert site.shapes[0][1] == 4 and site.shapes[1][1] == 2
    with torch.no_grad():
        reference = model(**inputs())
    assert rel_error(compiled.output.logits, reference.logits) <= REL_TOL[torch.float32]


def test_returned_attention_weights_keep_eager_attention() -> None:
    model = tiny_model("llama", "eager")
    compiled = compile_with_passes(model, **inputs(), output_attentions=True)
    assert OP not in compiled.rewritten_targets()
    assert not any(report.changed for report in compiled.reports)
    sites = compiled.sites()
    assert [site.status for site in sites] == ["untouched"] * LAYERS
    assert all("also used outside the attention" in site.reason for site in sites)
    with torch.no_grad():
        reference = model(**inputs(), output_attentions=True)
    assert rel_error(compiled.output.logits, reference.logits) <= REL_TOL[torch.float32]
    assert len(compiled.output.attentions) == LAYERS
    for weights, expected in zip(compiled.output.attentions, reference.attentions):
        assert rel_error(weights, expected) <= REL_TOL[torch.float32]


# Older attention forms (issue 19): name -> (model class, tiny config, attention layers, output field).
OLDER_FORMS: dict[str, tuple[Any, Any, int, str]] = {
    # .type(value.dtype) after the softmax
    "gpt2": (
        transformers.GPT2LMHeadModel,
        transformers.GPT2Config(vocab_size=64, n_embd=64, n_layer=LAYERS, n_head=4, n_positions=64),
        LAYERS,
        "logits",
    ),
    # ALiBi through baddbmm on [B*H, S, D], views to 4-D around the mask, bmm
    "bloom": (
        transformers.BloomForCausalLM,
        transformers.BloomConfig(vocab_size=64, hidden_size=64, n_layer=LAYERS, n_head=4),
        LAYERS,
        "logits",
    ),
    # relative position bias + mask, no scale; encoder self, decoder self and cross attention
    "t5": (
        transformers.T5ForConditionalGeneration,
        transformers.T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=64, num_layers=LAYERS, num_heads=4),
        3 * LAYERS,
        "logits",
    ),
    # bmm with kT divided by a 0-d tensor, a relative bias, masked_fill(~mask, finfo.min)
    "deberta_v2": (
        transformers.DebertaV2Model,
        transformers.DebertaV2Config(
            vocab_size=64, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64,
        ),
        LAYERS,
        "last_hidden_state",
    ),
    # logit soft-capping tanh(scores / cap) * cap (a cap of 1 bends these small scores), sliding and
    # global layers
    "gemma2": (
        transformers.Gemma2ForCausalLM,
        transformers.Gemma2Config(
            vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=LAYERS,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
            max_position_embeddings=64, attn_logit_softcapping=1.0, query_pre_attn_scalar=1,
        ),
        LAYERS,
        "logits",
    ),
}  # fmt: skip


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("family", sorted(OLDER_FORMS))
def test_older_attention_forms_become_the_op(family: str, dynamic: bool) -> None:
    """Every attention layer of eager GPT-2, BLOOM, T5, DeBERTa-v2 and Gemma 2 becomes the op (Gemma 2's
    with its soft-cap); dense equals eager."""
    model_class, config, layers, field_name = OLDER_FORMS[family]
    torch.manual_seed(0)
    model = model_class._from_config(config, attn_implementation="eager").eval()
    kwargs = inputs()
    if family == "t5":
        kwargs["decoder_input_ids"] = kwargs["input_ids"][:, :7]
    compiled = compile_with_passes(model, dynamic=dynamic, **kwargs)
    sites = compiled.sites()
    assert len(sites) == layers
    for site in sites:
        assert (site.status, site.pattern) == ("replaced", "eager"), site.reason
    assert compiled.rewritten_targets().count(OP) == layers
    caps = [
        node.args[12] if len(node.args) > 12 else None
        for report in compiled.reports
        for node in report.graph_module.graph.nodes
        if node.target is OP
    ]
    expected = getattr(config, "attn_logit_softcapping", None)  # dynamic: the graph's symbolic float
    assert all((cap is None) == (expected is None) and (dynamic or cap == expected) for cap in caps)
    with torch.no_grad():
        reference = getattr(model(**kwargs), field_name)
    output = getattr(compiled.output, field_name)
    if family != "t5":  # padded query rows: masked entirely in DeBERTa, where eager and the op differ
        keep = kwargs["attention_mask"].bool()
        output, reference = output[keep], reference[keep]
    assert rel_error(output, reference) <= REL_TOL[torch.float32]
