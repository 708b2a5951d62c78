"""The TensorRT path: the plugin-form pass (runs anywhere), the missing-extra error, and Torch-TensorRT
compilation and export (only where ``torch_tensorrt`` imports and a GPU is present: never on this
project's machines, which cannot install TensorRT)."""

from __future__ import annotations

import operator
import re
import sys

import pytest
import torch
import torch.nn.functional as F

import omnicompile
from omnicompile import OmniSparseConfig
from omnicompile.export import export, export_program
from omnicompile.passes import run_passes
from omnicompile.passes.plugin_attention import use_plugin_attention
from omnicompile.tensorrt import INSTALL_HINT, compile_tensorrt, load_tensorrt
from tests.helpers import REL_TOL, rel_error

ATTENTION = torch.ops.omnisparse.attention.default
PLUGIN = torch.ops.omnisparse.attention_plugin.default
PLUGIN_MASKED = torch.ops.omnisparse.attention_plugin_masked.default
CONFIGS = {"dense": OmniSparseConfig(mode="dense"), "sparse": OmniSparseConfig(block_size=16, min_seq_len=32)}


class _Attention(torch.nn.Module):
    """Causal SDPA (no mask) or SDPA under a bool mask input, over a fused projection; GQA 4:2."""

    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(32, 64)
        self.kv = torch.nn.Linear(32, 64)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q(x).view(batch, seq, 4, 16).transpose(1, 2)
        k, v = self.kv(x).view(batch, seq, 2, 2, 16).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return out.transpose(1, 2).reshape(batch, seq, 64)


def _inputs(seq: int, masked: bool, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    generator = torch.Generator().manual_seed(seq)
    inputs = {"x": torch.randn(1, seq, 32, generator=generator).to(device, dtype)}
    if masked:
        inputs["mask"] = (torch.rand(1, 1, seq, seq, generator=generator) > 0.3).to(device)
    return inputs


def _targets(gm: torch.fx.GraphModule) -> list:
    return [node.target for node in gm.graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize("mode", sorted(CONFIGS))
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "masked"])
def test_plugin_ops_replace_the_op_in_an_exported_program(mode, masked):
    model = _Attention()
    dynamic = {"x": {1: "seq"}, **({"mask": {2: "seq", 3: "seq"}} if masked else {})}
    exported = export_program(model, _inputs(48, masked), CONFIGS[mode], dynamic=dynamic)
    original, rewritten = exported.program.module(), exported.program.module()
    assert use_plugin_attention(rewritten)
    targets = _targets(rewritten)
    assert ATTENTION not in targets and targets.count(PLUGIN_MASKED if masked else PLUGIN) == 1
    plugin = next(node for node in rewritten.graph.nodes if node.target in (PLUGIN, PLUGIN_MASKED))
    assert plugin.args[4] == 0.25  # scale=None resolved to 1/sqrt(16)
    inputs = _inputs(70, masked)
    with torch.no_grad():
        got = rewritten(**inputs)
        assert torch.equal(got, original(**inputs))
        if mode == "dense":
            assert rel_error(got, model(**inputs)) < REL_TOL[torch.float32]


def test_plugin_ops_replace_the_op_in_a_dynamo_graph():
    model, inputs = _Attention(), _inputs(40, masked=False)
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graph = run_passes(gm, CONFIGS["dense"]).graph_module
        assert use_plugin_attention(graph)
        graphs.append(graph)
        return graph.forward

    with torch.no_grad():
        got = torch.compile(model, backend=backend, fullgraph=True)(**inputs)
        want = model(**inputs)
    assert PLUGIN in _targets(graphs[0]) and ATTENTION not in _targets(graphs[0])
    assert rel_error(got, want) < REL_TOL[torch.float32]


def test_site_whose_lse_is_used_stays():
    config = CONFIGS["dense"].to_json()

    def uses_lse(q, k, v):
        result = ATTENTION(q, k, v, None, 0.0, True, 0.5, False, config, "site")
        return operator.getitem(result, 0) + operator.getitem(result, 1).unsqueeze(-1)

    gm = torch.fx.symbolic_trace(uses_lse)
    before = gm.code
    assert not use_plugin_attention(gm)
    assert gm.code == before


def test_soft_capped_site_stays():
    """No plugin attribute holds an optional float: a site with a softcap keeps the op (and its cap)."""
    config = CONFIGS["dense"].to_json()

    def capped(q, k, v):
        return ATTENTION(q, k, v, None, 0.0, True, 0.5, False, config, "site", None, None, 30.0)[0]

    gm = torch.fx.symbolic_trace(capped)
    before = gm.code
    assert not use_plugin_attention(gm)
    assert gm.code == before


def test_missing_extra_is_a_clear_import_error(monkeypatch):
    model, inputs = _Attention(), _inputs(40, masked=False)
    gm, _ = torch._dynamo.export(model)(**inputs)
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # importing it now raises ImportError
    with pytest.raises(ImportError, match=re.escape(f"needs Torch-TensorRT: {INSTALL_HINT}")):
        compile_tensorrt(gm, list(inputs.values()))
    with pytest.raises(ImportError, match=re.escape(INSTALL_HINT)):
        omnicompile.backend(OmniSparseConfig(lowering="tensorrt"))(gm, list(inputs.values()))


def _tensorrt_on_gpu() -> None:
    pytest.importorskip("torch_tensorrt", reason=f"Torch-TensorRT is not installed ({INSTALL_HINT})")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA device")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", sorted(CONFIGS))
def test_backend_lowering_tensorrt_matches_inductor(mode):
    _tensorrt_on_gpu()
    model = _Attention().cuda().half()
    inputs = _inputs(256, masked=False, device="cuda", dtype=torch.float16)
    config = CONFIGS[mode]
    with torch.no_grad():
        want = torch.compile(model, backend=omnicompile.backend(config))(**inputs)
        got = torch.compile(model, backend=omnicompile.backend(config.replace(lowering="tensorrt")))(**inputs)
    assert rel_error(got, want) < REL_TOL[torch.float16]


@pytest.mark.gpu
def test_export_tensorrt_runs_two_lengths(tmp_path):
    _tensorrt_on_gpu()
    model = _Attention().cuda().half()
    seq = torch.export.Dim("seq", min=16, max=512)
    path = export(
        model,
        _inputs(256, False, "cuda", torch.float16),
        tmp_path / "m.ep",
        CONFIGS["sparse"],
        dynamic={"x": {1: seq}},
        target="tensorrt",
    )
    loaded = load_tensorrt(path)
    reference = torch.compile(model, backend=omnicompile.backend(CONFIGS["sparse"]), dynamic=True)
    with torch.no_grad():
        for length in (200, 384):
            inputs = _inputs(length, False, "cuda", torch.float16)
            assert rel_error(loaded(**inputs), reference(**inputs)) < REL_TOL[torch.float16]


def test_tensorrt_export_needs_bounded_dims(tmp_path):
    pytest.importorskip("torch_tensorrt", reason=f"Torch-TensorRT is not installed ({INSTALL_HINT})")
    with pytest.raises(ValueError, match="needs bounds"):
        export(
            _Attention(), _inputs(48, False), tmp_path / "m.ep", dynamic={"x": {1: "seq"}}, target="tensorrt"
        )
