"""The triton op ``omnisparse::sparse_attention`` and the export routes of `passes.inline_attention`.

On the CPU the op's kernels run in Triton's interpreter (real path) or not at all (fake path: the
outputs are allocations). What AOTInductor does with it on CUDA, the trace into one
``triton_kernel_wrapper_functional`` node per launch, runs in a fresh process without the
interpreter (tests/triton_trace_worker.py). Compiling and running such a package needs a GPU
(scripts/gpu_check_cpp_runner.sh).
"""

from __future__ import annotations

import json
import operator
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from omnicompile import OmniSparseConfig
from omnicompile.demos.structured import structured_qkv
from omnicompile.passes.attention_site import ATTENTION
from omnicompile.passes.inline_attention import (
    SPARSE_ATTENTION,
    inline_attention,
    inlined_attention_call,
)
from tests.helpers import REL_TOL, rel_error

pytestmark = pytest.mark.interpreter

CONFIG = OmniSparseConfig(block_size=16, min_seq_len=64)
WORKER = Path(__file__).with_name("triton_trace_worker.py")


def _qkv(seq: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [1, 4, seq, 32], k, v [1, 2, seq, 32] fp32 with sparse structure."""
    return structured_qkv("mixed", 1, 4, 2, seq, 32, seed=0, window=16, slash_period=96)


def test_real_path_equals_the_op():
    """Under the interpreter the triton op runs the Triton kernels (the probe: the reference's, on the
    CPU); the Python op runs the references: same selection, same attention (fp32)."""
    q, k, v = _qkv()
    out, lse = torch.ops.omnisparse.sparse_attention(q, k, v, True, None, CONFIG.to_json())
    want, want_lse = torch.ops.omnisparse.attention(
        q, k, v, None, 0.0, True, None, True, CONFIG.to_json(), "s"
    )
    assert rel_error(out, want) < REL_TOL[torch.float32]
    assert rel_error(lse, want_lse) < REL_TOL[torch.float32]


def test_call_that_is_not_all_triton_is_an_error():
    q, k, v = _qkv(48)  # below min_seq_len: the op would run dense
    with pytest.raises(ValueError, match="runs dense attention .kv length 48 < min_seq_len 64"):
        torch.ops.omnisparse.sparse_attention(q, k, v, True, None, CONFIG.to_json())


def test_fake_path_gives_shapes_and_dtypes():
    q, k, v = (t.bfloat16() for t in _qkv())
    with FakeTensorMode() as mode:
        out, lse = torch.ops.omnisparse.sparse_attention(
            *(mode.from_tensor(t) for t in (q, k, v)), True, None, CONFIG.to_json(), window=100
        )
    assert (out.shape, out.dtype) == (q.shape, q.dtype)
    assert (lse.shape, lse.dtype) == (q.shape[:3], torch.float32)


def _graph(
    device: str, config: OmniSparseConfig, seq: int = 128, window: int | None = None, mask: bool = False
):
    """A graph of one op call on fake bf16 tensors of ``device`` (as the passes leave it)."""
    with FakeTensorMode():
        shapes = {"q": (1, 4, seq, 32), "k": (1, 2, seq, 32), "v": (1, 2, seq, 32)}
        if mask:
            shapes["attn_mask"] = (1, 1, seq, seq)
        fakes = {
            name: torch.empty(
                shape, device=device, dtype=torch.bool if name == "attn_mask" else torch.bfloat16
            )
            for name, shape in shapes.items()
        }
    graph = torch.fx.Graph()
    nodes = {}
    for name, fake in fakes.items():
        nodes[name] = graph.placeholder(name)
        nodes[name].meta["example_value"] = fake
    args = (nodes["q"], nodes["k"], nodes["v"], nodes.get("attn_mask"), 0.0, not mask, None, True)
    call = graph.call_function(ATTENTION, (*args, config.to_json(), "site", window, None, None, False))
    graph.output((graph.call_function(operator.getitem, (call, 0)),))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


@pytest.mark.parametrize(
    "device, config, options, route, target, reason",
    [
        ("cuda", CONFIG, {}, "triton", SPARSE_ATTENTION, "every stage a Triton kernel"),
        ("cuda", CONFIG, {"window": 100}, "triton", SPARSE_ATTENTION, "every stage a Triton kernel"),
        ("cuda", CONFIG, {"window": 200}, "triton", SPARSE_ATTENTION, "every stage a Triton kernel"),
        ("cpu", CONFIG, {"window": 40}, "aten", inlined_attention_call, "window 40 < min_seq_len 64"),
        ("cuda", CONFIG, {"seq": 48}, "aten", inlined_attention_call, "kv length 48 < min_seq_len 64"),
        ("cpu", OmniSparseConfig(mode="dense"), {}, "aten", inlined_attention_call, "mode='dense'"),
        ("cpu", CONFIG, {}, "masked", inlined_attention_call, "the sparse method on the CPU"),
        ("cpu", CONFIG, {"mask": True}, "op", ATTENTION, "an attn_mask the passes did not prove"),
        ("cuda", CONFIG, {"mask": True}, "op", ATTENTION, "an attn_mask the passes did not prove"),
        ("cuda", OmniSparseConfig(mode="dense"), {"window": 40}, "op", ATTENTION, "the Triton band kernel"),
        (
            "cuda",
            OmniSparseConfig(block_size=16, min_seq_len=64, estimator="antidiagonal"),
            {},
            "op",
            ATTENTION,
            "fused kernel computes 'composite' and 'pooled'",
        ),
    ],
)
def test_routes(device, config, options, route, target, reason):
    gm = _graph(device, config, **options)
    (record,) = inline_attention(gm)
    assert (record.route, record.site) == (route, "site")
    assert reason in record.reason
    (call,) = (
        node for node in gm.graph.nodes if node.op == "call_function" and node.target != operator.getitem
    )
    assert call.target == target
    if route == "triton":  # the window the op would have used: None where it cuts nothing (>= Sq)
        window = options.get("window")
        assert call.kwargs["window"] == (window if window is not None and window < 128 else None)


def test_triton_route_traces_into_kernel_launches(tmp_path):
    """The export's Triton route as AOTInductor lowers it, on fake CUDA tensors without a GPU: one
    ``triton_kernel_wrapper_functional`` node per launch, the composite means and the causal allowed
    blocks the only torch computations, torch's mutation analysis finding what each kernel writes
    (`_select_kernel` is taken to write Ahat and allowed too, whose last reader it is), no clone
    left after Inductor's reinplacing, and Inductor's source of every kernel running."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    out = tmp_path / "trace.json"
    subprocess.run(
        [sys.executable, str(WORKER), str(out)], check=True, env=env, timeout=300, capture_output=True
    )
    result = json.loads(out.read_text())
    assert result["routes"] == ["triton"]
    views = ("aten.empty", "aten.new_empty", "aten.view", "aten.transpose")
    computing = {op for op in result["operators"] if not op.startswith(views)}
    assert computing == {"aten.mean.dim", "aten.ones.default", "aten.tril.default"}
    assert result["launches"] == [
        [name, writes, [], True]
        for name, writes in (
            ("composite_kernel", ["AHAT"]),
            ("probe_kernel", ["LSE", "STATS"]),
            ("probe_kernel", ["OUT"]),
            ("_need_kernel", ["LAZY", "NEED", "NUM_AVAILABLE", "NUM_FORCED"]),
            ("_take_kernel", ["LAZY_OUT", "TAKE"]),
            ("_select_kernel", ["AHAT", "ALLOWED", "KV_INDICES", "KV_NUM_BLOCKS"]),
            ("sparse_fwd_kernel", ["LSE", "O"]),
        )
    ]
