"""``attn_implementation="omnisparse"`` (omnicompile.hf_attention) on small random-weight models (fp32, CPU).

Dense mode equals SDPA (Llama, Qwen2, Gemma 3 with a sliding-window layer; unpadded, left- and
right-padded); Gemma 2 (logit soft-capping, eager only) equals eager in dense mode and at tau = 1;
each row of a padded batch in sparse mode equals the row run alone; generate, with and without a
SlimKVCache (which rejects a soft-cap); torch.compile with the eager and the omnisparse backends.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.masking_utils import (
    causal_mask_function,
    chunked_causal_mask_function,
    sliding_window_causal_mask_function,
)

from omnicompile import hf_attention
from omnicompile.config import OmniSparseConfig
from omnicompile.hf_attention import ATTN_IMPLEMENTATION, omnisparse_mask, set_config
from omnicompile.hf_cache import ATTN_IMPLEMENTATION as DECODE_IMPLEMENTATION
from omnicompile.hf_cache import SlimKVCache
from omnicompile.recording import recording
from tests.helpers import REL_TOL, SMALL_LM, rel_error

MODELS = {
    "llama": {},
    "qwen2": {},
    # layer 0 slides over 8 tokens, layer 1 is global
    "gemma3_text": {
        "head_dim": 16,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
    },
}
DENSE = OmniSparseConfig(mode="dense")
# Sparse on the CPU reference at small sizes: blocks of 16, 4-token composite tokens, from 32 keys on.
SPARSE = OmniSparseConfig(block_size=16, granularity=4, min_seq_len=32, tau=0.9)
EXACT = OmniSparseConfig(block_size=16, granularity=4, min_seq_len=16, tau=1.0, query_selection=False)


# Gemma 2: layer 0 slides over 8 tokens, layer 1 is global; scores soft-capped at 1 (scale 1: the
# cap bends these small scores; its effect on the logits is about 14x the tolerance).
GEMMA2 = {"head_dim": 16, "sliding_window": 8, "attn_logit_softcapping": 1.0, "query_pre_attn_scalar": 1}


def _model(model_type: str, config: OmniSparseConfig = DENSE) -> torch.nn.Module:
    extra = GEMMA2 if model_type == "gemma2" else MODELS[model_type]
    model_config = AutoConfig.for_model(model_type, **SMALL_LM, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config, attn_implementation=ATTN_IMPLEMENTATION).eval()
    set_config(model, config)
    return model


def _padded(lengths: list[int], left: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ids [B, max(lengths)], the 0/1 attention mask and the position ids of each row's tokens."""
    ids = torch.randint(
        0, SMALL_LM["vocab_size"], (len(lengths), max(lengths)), generator=torch.Generator().manual_seed(2)
    )
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        if left:
            mask[row, ids.shape[1] - n :] = 1
        else:
            mask[row, :n] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, positions


def _logits(model: torch.nn.Module, attn_implementation: str, **inputs: torch.Tensor) -> torch.Tensor:
    model.set_attn_implementation(attn_implementation)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_dense_mode_equals_sdpa(model_type: str, padding: str) -> None:
    model = _model(model_type)
    lengths = [20, 20] if padding == "none" else [14, 20]
    ids, mask, positions = _padded(lengths, left=padding == "left")
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    with recording(measure=False) as recorder:
        out = _logits(model, ATTN_IMPLEMENTATION, **inputs)
    reference = _logits(model, "sdpa", **inputs)
    keep = mask.bool()
    assert rel_error(out[keep], reference[keep]) <= REL_TOL[torch.float32]
    # Unpadded: one op call per layer over the batch; padded: one per row and layer, on the row's tokens.
    expected = [(2, 20)] * 2 if padding == "none" else [(1, 14), (1, 20)] * 2
    assert [(run.shapes[0][0], run.shapes[0][2]) for run in recorder.runs] == expected


@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize(
    "config",
    [DENSE, OmniSparseConfig(block_size=16, granularity=4, min_seq_len=32, tau=1.0, query_selection=False)],
    ids=["dense", "sparse_tau_1"],
)
def test_gemma2_soft_capping_equals_eager(config: OmniSparseConfig, padding: str) -> None:
    """The soft-cap reaches the op (every call carries it); dense mode, and the sparse path over every
    allowed block (48 tokens >= min_seq_len 32), equal eager at the unpadded positions."""
    model = _model("gemma2", config)
    ids, mask, positions = _padded([48, 48] if padding == "none" else [40, 48], left=padding == "left")
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    with recording(measure=False, keep_run=1) as recorder:
        out = _logits(model, ATTN_IMPLEMENTATION, **inputs)
    reference = _logits(model, "eager", **inputs)
    keep = mask.bool()
    assert rel_error(out[keep], reference[keep]) <= REL_TOL[torch.float32]
    assert recorder.runs[1].inputs[5] == 1.0
    if config is not DENSE:  # the global layer (the sliding one's window 8 < min_seq_len runs dense)
        assert "sparse" in {run.decision for run in recorder.runs}


def test_slim_cache_rejects_soft_capping() -> None:
    config = OmniSparseConfig(block_size=16, granularity=4, min_seq_len=32)
    model = _model("gemma2", config)
    ids = torch.randint(0, SMALL_LM["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="soft-capping"):
        _generate(model, ATTN_IMPLEMENTATION, ids, past_key_values=SlimKVCache(model.config, config))


def test_mask_function_builds_no_mask_for_causal_batches() -> None:
    """None without padding, [B, S] with left / right padding, the SDPA 4-D mask for the rest."""
    args = {"batch_size": 2, "q_length": 6, "kv_length": 6}
    assert omnisparse_mask(**args, attention_mask=torch.ones(2, 6, dtype=torch.bool)) is None
    assert omnisparse_mask(**args) is None
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6], dtype=torch.bool)
    for padding in (left, left.flip(-1)):
        assert torch.equal(omnisparse_mask(**args, attention_mask=padding), padding)
    holes = torch.tensor([[1, 0, 1, 1, 1, 1], [1] * 6], dtype=torch.bool)
    assert omnisparse_mask(**args, attention_mask=holes).shape == (2, 1, 6, 6)
    chunk = {"batch_size": 2, "q_length": 3, "kv_length": 9, "q_offset": 6}  # chunked prefill on a cache
    assert omnisparse_mask(**chunk) is None
    left = torch.tensor([[0, 0] + [1] * 7, [1] * 9], dtype=torch.bool)
    assert torch.equal(omnisparse_mask(**chunk, attention_mask=left), left)
    free_slots = {**chunk, "kv_length": 12}  # a static cache: 3 free slots after the chunk
    assert omnisparse_mask(**free_slots).shape == (2, 1, 3, 12)
    assert torch.equal(omnisparse_mask(**free_slots, attention_mask=left)[:, :9], left)
    sliding = sliding_window_causal_mask_function(4)
    assert omnisparse_mask(**args, mask_function=sliding, local_size=4) is None
    chunked = chunked_causal_mask_function(4, torch.zeros(2, dtype=torch.long))
    assert omnisparse_mask(**args, mask_function=chunked, local_size=4).shape == (2, 1, 6, 6)
    decode = {"batch_size": 1, "q_length": 1, "kv_length": 9, "q_offset": 8}
    assert omnisparse_mask(**decode, mask_function=causal_mask_function) is None
    assert omnisparse_mask(**decode, mask_function=sliding, local_size=4).shape == (1, 1, 1, 9)


@settings(max_examples=8, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=5, max_value=70), min_size=2, max_size=3),
    left=st.booleans(),
)
def test_sparse_rows_of_a_padded_batch_equal_each_row_alone(lengths: list[int], left: bool) -> None:
    model = _model("llama", SPARSE)
    ids, mask, positions = _padded(lengths, left)
    with recording(measure=False) as recorder:
        batch = _logits(
            model, ATTN_IMPLEMENTATION, input_ids=ids, attention_mask=mask, position_ids=positions
        )
    assert ("sparse" in {run.decision for run in recorder.runs}) == (max(lengths) >= SPARSE.min_seq_len)
    for row, n in enumerate(lengths):
        tokens = mask[row].bool()
        alone = _logits(model, ATTN_IMPLEMENTATION, input_ids=ids[row : row + 1, tokens])
        assert rel_error(batch[row, tokens], alone[0]) <= REL_TOL[torch.float32]


def _chunked_logits(model, ids, mask, chunk: int) -> torch.Tensor:
    """Logits [B, S, V] of ``ids`` prefilled ``chunk`` tokens at a time into one DynamicCache."""
    cache, logits = DynamicCache(config=model.config), []
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            end = min(start + chunk, ids.shape[1])
            out = model(
                input_ids=ids[:, start:end],
                attention_mask=mask[:, :end],
                past_key_values=cache,
                use_cache=True,
            )
            logits.append(out.logits)
    return torch.cat(logits, 1)


@pytest.mark.parametrize("config", [DENSE, EXACT], ids=["dense", "exact"])
@pytest.mark.parametrize("padding", ["none", "left"])
def test_chunked_prefill_equals_one_shot(config: OmniSparseConfig, padding: str) -> None:
    """Prefill in chunks of 24 into a DynamicCache (each chunk bottom-right causal over the cache, no 4-D
    mask built) equals the one-shot SDPA prefill at every real token."""
    model = _model("llama", config)
    ids, mask, _ = _padded([70, 53 if padding == "left" else 70], left=True)
    with recording(measure=False) as recorder:
        chunked = _chunked_logits(model, ids, mask, 24)
    if config is EXACT:
        assert "sparse" in {run.decision for run in recorder.runs}
        assert any(run.site.endswith(".prefix") for run in recorder.runs)
    keep = mask.bool()
    model.set_attn_implementation("sdpa")
    reference = _logits(model, "sdpa", input_ids=ids, attention_mask=mask)
    assert rel_error(chunked[keep], reference[keep]) <= REL_TOL[torch.float32]


def _positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])[None]


@pytest.mark.parametrize("config", [DENSE, SPARSE], ids=["dense", "sparse"])
@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens"])
def test_packed_sequences_equal_each_alone(config: OmniSparseConfig, how: str, monkeypatch) -> None:
    """Three sequences packed in one row (restarting position ids, or flash-attention's cu_seq_lens
    kwargs) give each sequence's logits run alone; the packed 4-D mask is checked once per forward,
    not once per layer."""
    model = _model("llama", config)
    lengths = [40, 9, 66]
    ids = torch.randint(
        0, SMALL_LM["vocab_size"], (1, sum(lengths)), generator=torch.Generator().manual_seed(4)
    )
    # use_cache=False: transformers then detects the packing too and builds its 4-D mask, which is checked
    inputs = {"input_ids": ids, "position_ids": _positions(lengths), "use_cache": False}
    if how == "cu_seq_lens":
        cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
        inputs |= {
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": max(lengths),
            "max_length_k": max(lengths),
        }
    checks = []
    real_mask = hf_attention.varlen_mask
    monkeypatch.setattr(hf_attention, "varlen_mask", lambda *a: checks.append(a) or real_mask(*a))
    with recording(measure=False) as recorder:
        packed = _logits(model, ATTN_IMPLEMENTATION, **inputs)
    assert {run.site for run in recorder.runs} >= {"hf.layer0.seq0", "hf.layer1.seq2"}
    assert len(checks) == 1  # two layers, one check
    start = 0
    for n in lengths:
        alone = _logits(model, ATTN_IMPLEMENTATION, input_ids=ids[:, start : start + n])
        assert rel_error(packed[:, start : start + n], alone) <= REL_TOL[torch.float32]
        start += n


def test_packed_sequences_with_another_mask_raise() -> None:
    model = _model("llama")
    layer = model.model.layers[0].self_attn
    q, k = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16)
    full = torch.ones(1, 1, 6, 6, dtype=torch.bool)  # not causal within each sequence
    with pytest.raises(ValueError, match="packed sequences with a mask"):
        hf_attention.attention_forward(layer, q, k, k, full, position_ids=_positions([3, 3]))


def _generate(model, attn_implementation: str, ids, attention_mask=None, **kwargs) -> torch.Tensor:
    """4 greedy tokens [B, 4] after ``ids`` (unpadded unless ``attention_mask`` says otherwise)."""
    model.set_attn_implementation(attn_implementation)
    attention_mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    out = model.generate(
        ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False, pad_token_id=0, **kwargs
    )
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_generate_equals_sdpa(model_type: str) -> None:
    """Greedy tokens of a left-padded batch (prefill per row, decode per row) equal SDPA's."""
    model = _model(model_type)
    ids, mask, _ = _padded([9, 20], left=True)
    tokens = _generate(model, ATTN_IMPLEMENTATION, ids, attention_mask=mask)
    assert torch.equal(tokens, _generate(model, "sdpa", ids, attention_mask=mask))


def test_generate_with_a_slim_cache_prefills_sparse_and_decodes_slim() -> None:
    """Sparse prefill (tau 1, every block: equal to dense) then slim decode: the tokens of
    ``"omnisparse_decode"`` (SDPA prefill, the same slim decode)."""
    config = OmniSparseConfig(
        block_size=16, granularity=4, min_seq_len=64, tau=1.0, query_selection=False,
        n_sink=1, recent_window=16, obs_window=8, head_mass_eps=1.0,
    )  # fmt: skip
    model = _model("llama", config)
    ids = torch.randint(0, SMALL_LM["vocab_size"], (1, 96), generator=torch.Generator().manual_seed(3))
    cache = SlimKVCache(model.config, config)
    with recording(measure=False) as recorder:
        tokens = _generate(model, ATTN_IMPLEMENTATION, ids, past_key_values=cache)
    assert [run.decision for run in recorder.runs] == ["sparse", "sparse"]  # prefill only: decode is slim
    assert all(layer is not None for layer in cache.slimming())
    reference = _generate(
        model, DECODE_IMPLEMENTATION, ids, past_key_values=SlimKVCache(model.config, config)
    )
    assert torch.equal(tokens, reference)


@pytest.mark.parametrize("compile_backend", ["eager", "omnisparse"])
def test_under_torch_compile(compile_backend: str) -> None:
    model = _model("llama")
    ids, mask, positions = _padded([14, 20], left=True)
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    reference = _logits(model, "sdpa", **inputs)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    torch._dynamo.reset()
    options = {"mode": "dense"} if compile_backend == "omnisparse" else None
    compiled = torch.compile(model, backend=compile_backend, options=options)
    with torch.no_grad():
        out = compiled(**inputs).logits
    keep = mask.bool()
    assert rel_error(out[keep], reference[keep]) <= REL_TOL[torch.float32]


def test_unsupported_features_raise() -> None:
    model = _model("llama")
    layer = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 16)
    k = torch.randn(1, 2, 3, 16)
    with pytest.raises(ValueError, match="a position bias"):
        hf_attention.attention_forward(layer, q, k, k, None, position_bias=torch.zeros(1, 4, 3, 3))
    with pytest.raises(ValueError, match="dropout"):
        hf_attention.attention_forward(layer, q, k, k, None, dropout=0.1)
    with pytest.raises(TypeError, match="OmniSparseConfig"):
        set_config(model, DENSE.to_dict())
