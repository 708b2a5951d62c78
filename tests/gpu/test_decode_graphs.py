"""Slim decode from CUDA graphs (a static tail, ``SlimKVCache(..., decode_capacity=C)``): the kernel and a
whole decode step are captured once and replayed while the tail fills (T read on the device), equal to
the eager step; `generate` compiles its decode steps with ``mode="reduce-overhead"`` and replays them
from Inductor's CUDA graphs with no skip. How to run: tests/gpu/__init__.py."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from omnicompile import OmniSparseConfig
from omnicompile.demos.models import build_model
from omnicompile.hf_cache import ATTN_IMPLEMENTATION, SlimKVCache
from omnicompile.kernels.decode.op import slim_decode
from omnicompile.kernels.decode.reference import slim_decode as reference_decode
from omnicompile.kernels.decode.slim_kv import SlimKV
from tests.gpu import ON_CUDA
from tests.helpers import REL_TOL, cuda_graph, rel_error

pytestmark = ON_CUDA

CONFIG = OmniSparseConfig(min_seq_len=1024)
PROMPT, NEW = 2048, 12


def test_the_kernel_replays_while_the_static_tail_fills():
    """Llama-3-8B-shaped heads (8 KV heads, G = 4, D = 128), bf16, 8K prompt tokens kept in part, 64 tail
    slots: one captured launch, replayed after each in-place append, equals the reference each time."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    batch, kv_heads, heads, prompt, dim, capacity = 1, 8, 32, 8192, 128, 64
    k, v = torch.randn(2, batch, kv_heads, prompt + capacity, dim, device="cuda", generator=gen).bfloat16()
    keep = torch.rand(batch, kv_heads, prompt, device="cuda", generator=gen) < 0.2
    kv = SlimKV.pack(k[:, :, :prompt], v[:, :, :prompt], keep, capacity)
    kv.append(k[:, :, prompt : prompt + 1], v[:, :, prompt : prompt + 1])
    q = torch.randn(batch, heads, 1, dim, device="cuda", generator=gen).bfloat16()
    graph, (out, lse) = cuda_graph(lambda: slim_decode(q, kv))
    for t in range(1, capacity):
        q.copy_(torch.randn(q.shape, device="cuda", generator=gen))
        graph.replay()
        ref_out, ref_lse = reference_decode(q, kv)
        assert rel_error(out, ref_out) < REL_TOL[torch.bfloat16], t
        assert torch.allclose(lse, ref_lse, atol=2e-2, rtol=0), t
        kv.append(k[:, :, prompt + t : prompt + t + 1], v[:, :, prompt + t : prompt + t + 1])


def _prefilled(model, ids: torch.Tensor) -> tuple[SlimKVCache, torch.Tensor]:
    """A static-tail cache after the prefill of ``ids`` [1, S], and the greedy next token [1, 1]."""
    cache = SlimKVCache(model.config, CONFIG, decode_capacity=NEW)
    logits = model(ids, past_key_values=cache, logits_to_keep=1).logits
    return cache, logits[:, -1].argmax(-1, keepdim=True)


@torch.no_grad()
def test_a_captured_decode_step_replays_as_the_eager_step():
    """The model's whole decode step (tiny Llama, bf16) captured by hand once and replayed per token
    (its input token and position copied in) gives the eager step's logits on a twin cache."""
    model = build_model(
        "llama-tiny", attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.bfloat16, device="cuda"
    )
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), device="cuda")
    eager_cache, token = _prefilled(model, ids)
    graph_cache, _ = _prefilled(model, ids)
    assert all(layer.slimming is not None for layer in graph_cache.layers)
    static_token, static_position = token.clone(), torch.tensor([[PROMPT]], device="cuda")

    def step(cache, token, position):
        return model(token, past_key_values=cache, position_ids=position, logits_to_keep=1).logits[:, -1]

    graph, static_logits = cuda_graph(lambda: step(graph_cache, static_token, static_position))
    graph_cache.crop(-1)  # the warm-up call's token
    for i in range(NEW):
        position = torch.tensor([[PROMPT + i]], device="cuda")
        want = step(eager_cache, token, position)
        static_token.copy_(token)
        static_position.copy_(position)
        graph.replay()
        assert rel_error(static_logits.float(), want.float()) < 1e-2, i
        token = want.argmax(-1, keepdim=True)
    for graphed, eager in zip(graph_cache.layers, eager_cache.layers):
        assert int(graphed.slim.tail_length) == int(eager.slim.tail_length) == NEW


@torch.no_grad()
def test_generate_replays_compiled_decode_steps_from_cuda_graphs():
    """generate compiles the static-tail cache's decode steps itself (``reduce-overhead``): fp32, the
    growing tail's tokens, Inductor's CUDA graphs used (no cudagraph skip), one graph for two calls."""
    model = build_model("llama-tiny", attn_implementation=ATTN_IMPLEMENTATION, device="cuda")
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), device="cuda")
    # the mask given: without it transformers 5.17 reads the random ids equal to pad_token_id as padding
    kwargs = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        do_sample=False,
        pad_token_id=0,
    )
    want = model.generate(ids, past_key_values=SlimKVCache(model.config, CONFIG), **kwargs)
    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):  # the first call compiles and records, the second replays
        cache = SlimKVCache(model.config, CONFIG, decode_capacity=NEW)
        got = model.generate(ids, past_key_values=cache, **kwargs)
        assert torch.equal(got, want)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    torch._dynamo.reset()
