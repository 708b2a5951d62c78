"""Traces the export's Triton route as AOTInductor does, without a GPU (tests/test_triton_op.py runs
it in a fresh process without ``TRITON_INTERPRET``, so that the kernels are ``triton.jit`` functions;
not collected).

Usage: ``python tests/triton_trace_worker.py OUT``. Builds a graph holding one ``omnisparse.attention``
call on fake CUDA tensors (bf16, static shapes), inlines it (`passes.inline_attention`: the triton op
``omnisparse::sparse_attention``) and traces that with ``aot_export_module`` (functionalization: the
triton op's body, each launch a ``triton_kernel_wrapper_functional`` node, as Inductor lowers it).
Torch's mutation analysis of each launch compiles the kernel to TTIR for a target; the machine's
driver has none, so the target is sm_90 (``GPUTarget("cuda", 90, 32)``). Then Inductor's
reinplacing pass, which turns a launch's clones of inputs that nothing reads later into in-place
writes. Saves ``OUT`` (JSON): the routes, the torch operators and, per launch in order, the
kernel's name, the tensors the analysis says it writes (``tensors_to_clone``), the clones left
after reinplacing, and whether Inductor's source of the kernel (with the jit functions and
constants it reaches) runs as a module.
"""

from __future__ import annotations

import importlib.util
import json
import operator
import sys
from pathlib import Path
from unittest import mock

import torch
import triton
from torch._functorch.aot_autograd import aot_export_module
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code
from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops_core
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner

from omnicompile import OmniSparseConfig
from omnicompile.passes.attention_site import ATTENTION
from omnicompile.passes.inline_attention import inline_attention

CONFIG = OmniSparseConfig(block_size=16, min_seq_len=64)
SHAPES = {"q": (1, 4, 128, 32), "k": (1, 2, 128, 32), "v": (1, 2, 128, 32)}


def main(out: str) -> None:
    with FakeTensorMode():
        fakes = {
            name: torch.empty(shape, device="cuda", dtype=torch.bfloat16) for name, shape in SHAPES.items()
        }
    graph = torch.fx.Graph()
    nodes = {}
    for name, fake in fakes.items():
        nodes[name] = graph.placeholder(name)
        nodes[name].meta["example_value"] = fake
    args = (nodes["q"], nodes["k"], nodes["v"], None, 0.0, True, None, True, CONFIG.to_json(), "site")
    call = graph.call_function(ATTENTION, args, {"need_lse": False})
    graph.output((graph.call_function(operator.getitem, (call, 0)),))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    records = inline_attention(gm)

    driver = mock.Mock()
    driver.get_current_target.return_value = GPUTarget("cuda", 90, 32)
    with mock.patch.object(triton.runtime.driver, "_active", driver, create=True):
        traced, _ = aot_export_module(gm, list(fakes.values()), trace_joint=False)
    calls = [n for n in traced.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]
    operators = [str(n.target) for n in calls if "triton_kernel_wrapper" not in str(n.target)]
    launches = [n for n in calls if "triton_kernel_wrapper" in str(n.target)]
    written = [sorted(n.kwargs["tensors_to_clone"]) for n in launches]
    reinplace_inplaceable_ops_core(traced.graph)
    result = {"routes": [r.route for r in records], "operators": operators, "launches": []}
    for node, writes in zip(launches, written):
        kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
        if isinstance(kernel, Autotuner):  # how the tracer holds a launch with num_warps / num_stages
            kernel = kernel.fn
        clones = sorted(node.kwargs["tensors_to_clone"])
        result["launches"].append([kernel.__name__, writes, clones, _source_runs(kernel, Path(out).parent)])
    with open(out, "w") as file:
        json.dump(result, file)


def _source_runs(kernel: triton.JITFunction, folder: Path) -> bool:
    """Whether the source Inductor writes for ``kernel`` imports as a module (a file in ``folder``:
    jit functions need one) and defines it as a jit function."""
    path = folder / f"inductor_{kernel.__name__}.py"
    source = user_defined_triton_kernel_transitive_closure_source_code(kernel)
    # The kernel comes first, undecorated (Inductor writes its own decorators), then what it reaches.
    path.write_text("import triton\nimport triton.language as tl\n\n@triton.jit\n" + source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return isinstance(getattr(module, kernel.__name__, None), triton.JITFunction)


if __name__ == "__main__":
    main(sys.argv[1])
