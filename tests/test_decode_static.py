"""The static tail of a slim cache (``SlimKVCache(..., decode_capacity=C)``): the decode step that a CUDA
graph replays, checked on the CPU against the growing tail (kernel, reference, storage, `generate`
eager and compiled with Inductor)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoConfig, AutoModelForCausalLM, CompileConfig

from omnicompile.config import OmniSparseConfig
from omnicompile.hf_cache import ATTN_IMPLEMENTATION, SlimKVCache
from omnicompile.kernels.decode.op import slim_decode as op_decode
from omnicompile.kernels.decode.reference import slim_decode as reference_decode
from omnicompile.kernels.decode.slim_kv import SlimKV
from omnicompile.kernels.decode.triton_decode import slim_decode as triton_decode
from omnicompile.kernels.decode.triton_decode import supported
from tests.helpers import REL_TOL, SMALL_LM, rel_error

PROMPT, NEW = 96, 6
SLIM = OmniSparseConfig(block_size=16, n_sink=1, recent_window=16, obs_window=8, min_seq_len=64)
ALL_LOCAL = SLIM.replace(head_mass_eps=1.0)  # every head local: sink and recent window only


def _slim_pair(dtype: torch.dtype, capacity: int, tail: int) -> tuple[SlimKV, SlimKV]:
    """The same slim cache with a growing tail and with a static one of ``capacity`` slots, both holding
    ``tail`` tokens; the static tail's free slots hold NaN (they must never be read)."""
    gen = torch.Generator().manual_seed(0)
    batch, kv_heads, prompt, dim = 2, 2, 70, 32
    k, v = torch.randn(2, batch, kv_heads, prompt + tail, dim, generator=gen).to(dtype).unbind(0)
    keep = (
        torch.rand(batch, kv_heads, prompt, generator=gen) < torch.tensor([[0.0, 0.3], [0.9, 0.5]])[..., None]
    )
    growing = SlimKV.pack(k[:, :, :prompt], v[:, :, :prompt], keep)
    static = SlimKV.pack(k[:, :, :prompt], v[:, :, :prompt], keep, capacity)
    static.k_tail.fill_(float("nan"))
    static.v_tail.fill_(float("nan"))
    for t in range(prompt, prompt + tail, 2):  # appended two tokens at a time, then one
        step = slice(t, min(t + 2, prompt + tail))
        growing = growing.append(k[:, :, step], v[:, :, step])
        assert static.append(k[:, :, step], v[:, :, step]) is static
    return growing, static


@pytest.mark.parametrize("n", [1, 3])
def test_reference_reads_the_tail_length_from_the_device(n):
    growing, static = _slim_pair(torch.float32, capacity=12, tail=5)
    assert static.tail_len is None and int(static.tail_length) == 5 == growing.tail_len
    q = torch.randn(2, 6, n, 32, generator=torch.Generator().manual_seed(1))
    out, lse = reference_decode(q, static, scale=0.3)
    ref_out, ref_lse = reference_decode(q, growing, scale=0.3)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_on_a_static_tail_matches_the_reference(dtype):
    """The split geometry covers the capacity (64 slots: splits past T are empty); NaN slots unread."""
    growing, static = _slim_pair(dtype, capacity=64, tail=5)
    q = torch.randn(2, 6, 2, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
    assert supported(q, static) is None
    out, lse = triton_decode(q, static, scale=0.3)
    ref_out, ref_lse = reference_decode(q, growing, scale=0.3)
    assert rel_error(out, ref_out) < REL_TOL[dtype]
    assert torch.allclose(lse, ref_lse, atol=1e-3, rtol=1e-3)
    op_out, op_lse = op_decode(q, static, scale=0.3)  # the custom op: the kernel, contiguous outputs
    assert torch.equal(op_out, out) and torch.equal(op_lse, lse) and op_out.is_contiguous()


def test_static_tail_appends_and_drops_in_place():
    growing, static = _slim_pair(torch.float32, capacity=6, tail=5)
    pointers = [t.data_ptr() for t in static.tensors()]
    new = torch.randn(2, 2, 1, 32)
    assert static.append(new, new) is static and int(static.tail_length) == 6
    assert torch.equal(static.k_tail[:, :, 5:6], new)
    assert [t.data_ptr() for t in static.tensors()] == pointers
    with pytest.raises(ValueError, match="the static tail is full: 6 of 6 slots used, 1 more"):
        static.append(new, new)
    assert static.drop_tail(2) is static and int(static.tail_length) == 4
    with pytest.raises(ValueError, match="cannot drop 5 of 4 tail tokens"):
        static.drop_tail(5)
    assert int(growing.drop_tail(2).tail_length) == growing.drop_tail(2).tail_len == 3
    with pytest.raises(ValueError, match="capacity >= 1"):
        k = torch.zeros(1, 2, 6, 32)
        SlimKV.pack(k, k, torch.ones(1, 2, 6, dtype=torch.bool), capacity=0)


def test_a_traced_overflow_fails_instead_of_overwriting():
    """Under torch.compile the host check is not traced; the index copy's own bounds check fails."""
    _, static = _slim_pair(torch.float32, capacity=6, tail=6)
    append = torch.compile(lambda kv, x: kv.append(x, x).tail_length + 0, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="(?i)index"):
        append(static, torch.randn(2, 2, 1, 32))


def _model(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **SMALL_LM)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def _prompt(batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ids [batch, PROMPT]; batch 3 is left-padded to rows of 96, 76 and 40 tokens (40 < min_seq_len)."""
    ids = torch.randint(
        1, SMALL_LM["vocab_size"], (batch, PROMPT), generator=torch.Generator().manual_seed(3)
    )
    if batch == 1:
        return ids, None
    mask = torch.ones(batch, PROMPT, dtype=torch.long)
    for row, n in enumerate([PROMPT, PROMPT - 20, 40]):
        mask[row, : PROMPT - n] = 0
        ids[row, : PROMPT - n] = 0
    return ids, mask


def _generate(model, ids, mask, cache, attn: str = ATTN_IMPLEMENTATION, new: int = NEW, **kwargs):
    """(tokens [B, new], scores [new, B, V]) of greedy decoding."""
    model.set_attn_implementation(attn)
    out = model.generate(
        ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new, min_new_tokens=new,
        do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True, **kwargs,
    )  # fmt: skip
    return out.sequences[:, ids.shape[1] :], torch.stack(out.scores)


def _compiled(backend: str) -> CompileConfig:
    """generate's compile config, on the CPU too (transformers compiles on accelerators only)."""
    config = CompileConfig(backend=backend, mode="default", fullgraph=True)
    config._compile_all_devices = True
    return config


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("batch", [1, 3], ids=["batch1", "left-padded"])
def test_static_tail_decodes_as_the_growing_tail(model_type, batch):
    model = _model(model_type)
    ids, mask = _prompt(batch)
    config = SLIM if batch == 1 else ALL_LOCAL
    tokens, scores = _generate(model, ids, mask, SlimKVCache(model.config, config))
    cache = SlimKVCache(model.config, config, decode_capacity=NEW - 1)
    assert cache.is_compileable and not SlimKVCache(model.config, config).is_compileable
    static_tokens, static_scores = _generate(model, ids, mask, cache, disable_compile=True)
    assert torch.equal(static_tokens, tokens)
    assert torch.allclose(static_scores, scores, atol=1e-5, rtol=1e-5)
    assert all(int(layer.slim.tail_length) == NEW - 1 == layer.slim.capacity for layer in cache.layers)


def test_left_padded_static_tail_with_the_op_implementation():
    import omnicompile.hf_attention  # noqa: F401  (registers "omnisparse")

    model = _model("llama")
    model.config.omnisparse_config = ALL_LOCAL.to_json()
    ids, mask = _prompt(3)
    tokens, scores = _generate(model, ids, mask, SlimKVCache(model.config, ALL_LOCAL), "omnisparse")
    cache = SlimKVCache(model.config, ALL_LOCAL, decode_capacity=NEW)
    static_tokens, static_scores = _generate(model, ids, mask, cache, "omnisparse", disable_compile=True)
    assert torch.equal(static_tokens, tokens)
    assert torch.allclose(static_scores, scores, atol=1e-5, rtol=1e-5)


def test_generate_compiles_one_graph_for_every_decode_step():
    """generate's own compiled decode (Inductor, fullgraph): the growing tail's tokens, one graph for
    two generate calls with two caches (no recompilation per step or per cache)."""
    model = _model("qwen2")
    ids, _ = _prompt(1)
    tokens, scores = _generate(model, ids, None, SlimKVCache(model.config, SLIM))
    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):
        cache = SlimKVCache(model.config, SLIM, decode_capacity=NEW)
        compiled_tokens, compiled_scores = _generate(
            model, ids, None, cache, compile_config=_compiled("inductor")
        )
        assert torch.equal(compiled_tokens, tokens)
        assert torch.allclose(compiled_scores, scores, atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    torch._dynamo.reset()


def test_short_prompt_is_packed_whole():
    """A prompt below min_seq_len is not slimmed; a static tail still packs it (every token kept)."""
    model = _model("llama")
    ids, _ = _prompt(1)
    config = SLIM.replace(min_seq_len=PROMPT + 1)
    tokens, scores = _generate(model, ids, None, SlimKVCache(model.config, config))
    cache = SlimKVCache(model.config, config, decode_capacity=NEW)
    static_tokens, static_scores = _generate(model, ids, None, cache, disable_compile=True)
    assert torch.equal(static_tokens, tokens)
    assert torch.allclose(static_scores, scores, atol=1e-5, rtol=1e-5)
    assert cache.slimming() == [None, None]
    assert all(lengths.tolist() == [[PROMPT + NEW - 1] * 2] for lengths in cache.kept_lengths())


def test_crop_capacity_and_errors():
    model = _model("llama")
    ids, _ = _prompt(1)
    growing, static = SlimKVCache(model.config, SLIM), SlimKVCache(model.config, SLIM, decode_capacity=NEW)
    _generate(model, ids, None, growing)
    _generate(model, ids, None, static, disable_compile=True)
    with pytest.raises(ValueError, match="only the 5 tokens added after slimming"):
        static.crop(-6)
    growing.crop(-2)
    static.crop(-2)
    assert int(static.get_seq_length()) == growing.get_seq_length() == PROMPT + NEW - 3
    assert static.get_mask_sizes(1, 0) == (PROMPT + NEW, 0) and static.get_max_length() == PROMPT + NEW
    token = torch.tensor([[5]])
    position = torch.tensor([[PROMPT + NEW - 3]])
    logits = [model(token, past_key_values=c, position_ids=position).logits for c in (growing, static)]
    assert torch.allclose(logits[0], logits[1], atol=1e-5, rtol=1e-5)

    full = SlimKVCache(model.config, SLIM, decode_capacity=3)
    with pytest.raises(ValueError, match="the static tail is full: 3 of 3 slots used"):
        _generate(model, ids, None, full, disable_compile=True)
    with pytest.raises(ValueError, match="decode_capacity must be None or an int >= 1"):
        SlimKVCache(model.config, SLIM, decode_capacity=0)
    gemma = AutoConfig.for_model(
        "gemma3_text", layer_types=["sliding_attention", "full_attention"], **SMALL_LM, head_dim=16
    )
    with pytest.raises(ValueError, match="full-attention layers only"):
        SlimKVCache(gemma, SLIM, decode_capacity=4)
