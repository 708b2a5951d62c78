"""`SlimKVCache` with model.generate on small random-weight Llama / Qwen2 models (fp32, CPU)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from omnicompile.config import OmniSparseConfig
from omnicompile.hf_cache import ATTN_IMPLEMENTATION, SlimKVCache
from tests.helpers import SMALL_LM

PROMPT, NEW = 96, 6
# Sink: 1 block of 16 tokens; recent: the last 16; R is everything between.
SLIM = OmniSparseConfig(block_size=16, n_sink=1, recent_window=16, obs_window=8, min_seq_len=64)
KEEP_ALL = SLIM.replace(head_mass_eps=0.0, tau_decode=1.0)
ALL_LOCAL = SLIM.replace(head_mass_eps=1.0)  # every head's mass on R is < 1: every head is local


def _model(model_type: str, **overrides) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type, **{**SMALL_LM, **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def _greedy(model, ids, cache, attn_implementation: str):
    model.set_attn_implementation(attn_implementation)
    out = model.generate(
        ids,
        past_key_values=cache,
        max_new_tokens=NEW,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.scores)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize(
    "config", [SLIM.replace(min_seq_len=PROMPT + 1), KEEP_ALL], ids=["short-prompt", "keep-all"]
)
def test_slimming_off_equals_dynamic_cache(model_type, config):
    """A prompt below min_seq_len (dense path) or a rule that keeps everything (ragged path): same tokens."""
    model = _model(model_type)
    ids = torch.randint(0, SMALL_LM["vocab_size"], (1, PROMPT))
    ref_tokens, ref_scores = _greedy(model, ids, DynamicCache(), "eager")
    cache = SlimKVCache(model.config, config)
    tokens, scores = _greedy(model, ids, cache, ATTN_IMPLEMENTATION)
    assert torch.equal(tokens, ref_tokens)
    assert torch.allclose(scores, ref_scores, atol=1e-4, rtol=1e-4)
    slimmed = config is KEEP_ALL
    assert all((layer is not None) == slimmed for layer in cache.slimming())
    assert all(lengths.tolist() == [[PROMPT + NEW - 1] * 2] for lengths in cache.kept_lengths())


def test_local_heads_decode_over_sink_and_recent_only():
    """All heads local: decode must equal dense decode with the long-range region masked out."""
    model = _model("llama")
    ids = torch.randint(0, SMALL_LM["vocab_size"], (1, PROMPT))
    cache = SlimKVCache(model.config, ALL_LOCAL)
    tokens, scores = _greedy(model, ids, cache, ATTN_IMPLEMENTATION)

    model.set_attn_implementation("eager")
    dense = DynamicCache()
    logits = model(ids, past_key_values=dense).logits[:, -1]
    ref_scores, ref_tokens = [logits], [logits.argmax(-1, keepdim=True)]
    for step in range(1, NEW):
        mask = torch.zeros(1, 1, 1, PROMPT + step)
        mask[..., 16 : PROMPT - 16] = float("-inf")  # R: outside the sink and the recent window
        position = torch.tensor([[PROMPT + step - 1]])
        logits = model(
            ref_tokens[-1], past_key_values=dense, attention_mask=mask, position_ids=position
        ).logits[:, -1]
        ref_scores.append(logits)
        ref_tokens.append(logits.argmax(-1, keepdim=True))
    assert torch.equal(tokens, torch.cat(ref_tokens, dim=1))
    assert torch.allclose(scores, torch.stack(ref_scores), atol=1e-4, rtol=1e-4)

    kept = 16 + 16 + NEW - 1
    assert all(lengths.tolist() == [[kept, kept]] for lengths in cache.kept_lengths())
    assert all(layer.local_heads.all() for layer in cache.slimming())
    head_dim = SMALL_LM["hidden_size"] // SMALL_LM["num_attention_heads"]
    # K and V of 2 heads, fp32; int32 offsets and lengths [1, 2] and the tail length
    per_layer = 2 * kept * 2 * head_dim * 4 + 2 * 2 * 4 + 4
    assert cache.stored_bytes() == SMALL_LM["num_hidden_layers"] * per_layer


def test_token_mask_makes_the_region_the_marked_tokens():
    model = _model("qwen2")
    ids = torch.randint(0, SMALL_LM["vocab_size"], (1, PROMPT))
    visual = torch.zeros(PROMPT, dtype=torch.bool)
    visual[30:50] = True
    cache = SlimKVCache(model.config, ALL_LOCAL, token_mask=visual)
    _greedy(model, ids, cache, ATTN_IMPLEMENTATION)
    assert all(lengths.tolist() == [[PROMPT - 20 + NEW - 1] * 2] for lengths in cache.kept_lengths())


def test_dropping_the_cache_frees_its_tensors_without_garbage_collection():
    """The tag on returned keys must not form a reference cycle that keeps a dropped cache's memory alive."""
    model = _model("llama")
    ids = torch.randint(0, SMALL_LM["vocab_size"], (1, PROMPT))
    gc.disable()
    try:
        cache = SlimKVCache(model.config, SLIM)
        _greedy(model, ids, cache, ATTN_IMPLEMENTATION)
        packed, tail = weakref.ref(cache.layers[0].slim.k_packed), weakref.ref(cache.layers[0].slim.k_tail)
        del cache
        assert packed() is None and tail() is None
    finally:
        gc.enable()


def test_batch_rows_are_slimmed_independently():
    model = _model("qwen2")
    ids = torch.randint(0, SMALL_LM["vocab_size"], (2, PROMPT))
    both, _ = _greedy(model, ids, SlimKVCache(model.config, SLIM), ATTN_IMPLEMENTATION)
    for row in range(2):
        alone, _ = _greedy(model, ids[row : row + 1], SlimKVCache(model.config, SLIM), ATTN_IMPLEMENTATION)
        assert torch.equal(both[row], alone[0])


@pytest.mark.parametrize("attn_implementation", [ATTN_IMPLEMENTATION, "omnisparse"])
def test_left_padded_rows_are_slimmed_alone(attn_implementation):
    """A left-padded batch (rows of 96, 76 and 40 tokens; 40 < min_seq_len) decodes each row as the row
    alone: each row slimmed on its own tokens (every head local: sink and recent window), padding
    never kept."""
    import omnicompile.hf_attention  # noqa: F401  (registers "omnisparse")

    model = _model("llama")
    model.config.omnisparse_config = ALL_LOCAL.to_json()
    lengths = [PROMPT, PROMPT - 20, 40]
    ids = torch.randint(1, SMALL_LM["vocab_size"], (3, PROMPT), generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(3, PROMPT, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, PROMPT - n :] = 1
        ids[row, : PROMPT - n] = 0
    cache = SlimKVCache(model.config, ALL_LOCAL)
    model.set_attn_implementation(attn_implementation)
    out = model.generate(
        ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
        output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    tokens, scores = out.sequences[:, PROMPT:], torch.stack(out.scores)
    kept = cache.kept_lengths()[0]
    assert kept[2].tolist() == [40 + NEW - 1] * 2  # the short row keeps its tokens, not its padding
    assert kept[:2].tolist() == [[16 + 16 + NEW - 1] * 2] * 2  # the long rows keep sink and recent
    for row, n in enumerate(lengths):
        alone, alone_scores = _greedy(
            model, ids[row : row + 1, PROMPT - n :], SlimKVCache(model.config, ALL_LOCAL), attn_implementation
        )
        steps = alone.shape[1]  # alone may stop early at the end-of-sequence token
        assert torch.equal(tokens[row, :steps], alone[0])
        assert torch.allclose(scores[:steps, row], alone_scores[:, 0], atol=1e-4, rtol=1e-4)


def test_misuse_raises_clear_errors():
    model = _model("llama")
    ids = torch.randint(0, SMALL_LM["vocab_size"], (1, PROMPT))
    with pytest.raises(RuntimeError, match="never observed"):
        _greedy(model, ids, SlimKVCache(model.config, SLIM), "sdpa")
    with pytest.raises(NotImplementedError, match="beam search"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        model.generate(ids, past_key_values=SlimKVCache(model.config, SLIM), max_new_tokens=3, num_beams=2)
    padded = torch.ones(2, PROMPT, dtype=torch.long)
    padded[0, -5:] = 0  # right padding: decode would append after the padding
    with pytest.raises(ValueError, match="only left padding"):
        model.generate(
            ids.repeat(2, 1),
            attention_mask=padded,
            past_key_values=SlimKVCache(model.config, SLIM),
            max_new_tokens=2,
            pad_token_id=0,
        )

    cache = SlimKVCache(model.config, SLIM)
    _greedy(model, ids, cache, ATTN_IMPLEMENTATION)
    with pytest.raises(ValueError, match="batch size changed"):
        model(ids[:, :1].repeat(2, 1), past_key_values=cache)
    with pytest.raises(ValueError, match="only the 5 tokens added after slimming"):
        cache.crop(-6)
    other = _model("llama", num_key_value_heads=4)
    with pytest.raises(ValueError, match="different model"):
        other.set_attn_implementation(ATTN_IMPLEMENTATION)
        other(ids, past_key_values=SlimKVCache(model.config, SLIM))
    with pytest.raises(ValueError, match="full and sliding-window attention layers are supported"):
        SlimKVCache(AutoConfig.for_model("llama", layer_types=["chunked_attention"] * 2, **SMALL_LM), SLIM)
    with pytest.raises(TypeError, match="OmniSparseConfig"):
        SlimKVCache(model.config, SLIM.to_dict())


def _gemma3(sliding_window: int = 24):
    """Gemma 3 (text): layer 0 sliding-window, layer 1 global, as the real model interleaves them."""
    overrides = {**SMALL_LM, "head_dim": 16, "sliding_window": sliding_window}
    config = AutoConfig.for_model(
        "gemma3_text", layer_types=["sliding_attention", "full_attention"], **overrides
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("config", [KEEP_ALL, ALL_LOCAL], ids=["keep-all", "all-local"])
def test_sliding_window_layers_keep_their_window(config):
    """Gemma 3: the sliding layer is transformers' window cache (window - 1 tokens, never slimmed), the
    global layer is slimmed; keeping everything decodes exactly as the dense cache does."""
    model = _gemma3()
    ids = torch.randint(0, SMALL_LM["vocab_size"], (1, PROMPT))
    ref_tokens, ref_scores = _greedy(model, ids, DynamicCache(config=model.config), "eager")
    cache = SlimKVCache(model.config, config)
    tokens, scores = _greedy(model, ids, cache, ATTN_IMPLEMENTATION)
    sliding, full = cache.kept_lengths()
    assert sliding.tolist() == [[23] * 2] and cache.slimming()[0] is None and cache.slimming()[1] is not None
    if config is KEEP_ALL:
        assert torch.equal(tokens, ref_tokens)
        assert torch.allclose(scores, ref_scores, atol=1e-4, rtol=1e-4)
        assert full.tolist() == [[PROMPT + NEW - 1] * 2]
    else:
        dense_bytes = 2 * 2 * 2 * (PROMPT + NEW - 1) * 16 * 4  # layers x (K, V) x Hkv x tokens x D x fp32
        assert (full < PROMPT).all() and cache.stored_bytes() < dense_bytes


def test_older_transformers_layer_api():
    """transformers < 5.3 passes cache_position to get_mask_sizes and asks get_max_cache_shape."""
    model = _model("llama")
    cache = SlimKVCache(model.config, KEEP_ALL)
    _greedy(model, torch.randint(0, SMALL_LM["vocab_size"], (1, PROMPT)), cache, ATTN_IMPLEMENTATION)
    layer = cache.layers[0]
    assert layer.slim is not None
    assert layer.get_mask_sizes(torch.arange(PROMPT + NEW - 1, PROMPT + NEW + 2)) == layer.get_mask_sizes(3)
    assert layer.get_mask_sizes(3) == (PROMPT + NEW - 1 + 3, 0)
    assert layer.get_max_cache_shape() == layer.get_max_length() == -1
