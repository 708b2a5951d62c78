"""Traces the export's Triton route as AOTInductor does, without a GPU (tests/test_triton_op.py runs
it in a fresh process without ``TRITON_INTERPRET``, so that the kernels are ``triton.jit`` functions;
not collected).

Usage: ``python tests/triton_trace_worker.py OUT``. Builds a graph holding one ``omnisparse.attention``
call on fake CUDA tensors (bf16, static shapes), inlines it (`passes.inline_attention`: the triton op
``omnisparse::sparse_attention``) and traces that with ``aot_export_module`` (functionalization: the
triton op's body, each launch a ``triton_kernel_wrapper_functional`` node, as Inductor lowers it).
Torch's mutation analysis of each launch compiles the kernel to TTIR for a target; the machine's
driver has none, so the target is sm_90 (``GPUTarget("cuda", 90, 32)``). Saves ``OUT`` (JSON): the
routes, the torch operators and, per launch in order, the kernel's name and the tensors the analysis
says it writes (``tensors_to_clone``).
"""

from __future__ import annotations

import json
import operator
import sys
from unittest import mock

import torch
import triton
from torch._functorch.aot_autograd import aot_export_module
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.backends.compiler import GPUTarget

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
    operators, launches = [], []
    for node in (n for n in traced.graph.nodes if n.op == "call_function"):
        if "triton_kernel_wrapper" in str(node.target):
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            launches.append([kernel.fn.__name__, sorted(node.kwargs["tensors_to_clone"])])
        elif node.target is not operator.getitem:
            operators.append(str(node.target))
    result = {"routes": [r.route for r in records], "operators": operators, "launches": launches}
    with open(out, "w") as file:
        json.dump(result, file)


if __name__ == "__main__":
    main(sys.argv[1])
