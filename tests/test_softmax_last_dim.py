"""`passes.softmax_last_dim`: a softmax over the queries is not attention and must stay what it is
through the backend, whose Inductor lowering would otherwise match it as attention (pytorch 196468)."""

from __future__ import annotations

import pytest
import torch

import omnicompile  # noqa: F401  (registers the "omnisparse" backend)
from omnicompile.backend import backend
from omnicompile.config import OmniSparseConfig
from omnicompile.passes import PassReport
from tests.helpers import REL_TOL, rel_error


def _softmax_over_queries(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * 0.125, dim=-2) @ v


def _softmax_dim1_float(q, k, v):
    return (q @ k.transpose(-2, -1)).softmax(1, dtype=torch.float32).to(q.dtype) @ v


@pytest.mark.parametrize("fn", [_softmax_over_queries, _softmax_dim1_float])
def test_non_last_dim_softmax_equals_eager(fn):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 64) for _ in range(3))
    reports: list[PassReport] = []
    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend(OmniSparseConfig(mode="dense"), reports=reports))(q, k, v)
    assert rel_error(out, fn(q, k, v)) < REL_TOL[torch.float32]
    graph = reports[0].graph_module.graph
    softmaxes = [n for n in graph.nodes if n.target in (torch.softmax, "softmax")]
    assert [n.args[1] for n in softmaxes] == [-1]
    assert not reports[0].sites  # not attention: nothing rewritten into the op


def test_attention_softmax_is_still_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    reports: list[PassReport] = []
    torch._dynamo.reset()
    fn = lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v  # noqa: E731
    out = torch.compile(fn, backend=backend(OmniSparseConfig(mode="dense"), reports=reports))(q, k, v)
    assert rel_error(out, fn(q, k, v)) < REL_TOL[torch.float32]
    assert [site.status for site in reports[0].sites] == ["replaced"]
