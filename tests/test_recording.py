"""What the op records: kept inputs are copies (a compiled graph reuses the op's input buffers), and the
dense-decision log is bounded."""

from __future__ import annotations

import logging

import torch
import transformers

import omnicompile
from omnicompile import ops
from omnicompile.config import OmniSparseConfig
from omnicompile.evaluate import sparse_attention
from omnicompile.recording import recording
from tests.helpers import REL_TOL, rel_error

DENSE = OmniSparseConfig(mode="dense")


def _llama(layers: int) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def test_kept_inputs_of_a_compiled_model_are_copies():
    """Layer 0's kept q/k, recorded inside a compiled 6-layer model, equal the eager op's (Inductor
    reuses the buffers of the earlier layers' q/k for later layers)."""
    model, ids = _llama(6), torch.randint(0, 64, (1, 48))
    with torch.no_grad():
        with recording(measure=False, keep_run=0) as eager, sparse_attention(model, DENSE):
            model(ids, use_cache=False)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=omnicompile.backend(DENSE))
        with recording(measure=False, keep_run=0) as inside:
            compiled(ids, use_cache=False)
    assert len(inside.runs) == 6
    for kept, reference in zip(inside.runs[0].inputs[:2], eager.runs[0].inputs[:2]):
        assert rel_error(kept, reference) < REL_TOL[torch.float32]


def test_dense_decision_log_is_once_per_site_and_kind(caplog, monkeypatch):
    monkeypatch.setattr(ops, "_LOGGED", set())
    with caplog.at_level(logging.INFO, logger="omnicompile"):
        for density in (0.91, 0.93, 0.97):
            ops._log_dense_once("g0.sdpa", f"selection density {density} > dense_fallback_density 0.9")
        ops._log_dense_once("g0.sdpa", "kv length 100 < min_seq_len 4096")
    assert len(ops._LOGGED) == 2 and len(caplog.records) == 2
