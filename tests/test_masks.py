"""Mask handling: classification, validation, the bias of position pairs and allowed blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from omnicompile.kernels.masks import allowed_blocks, check_qkv, classify_mask, mask_bias, validate_mask
from tests.attention_cases import Case, cases, dense_bias, make_mask, make_qkv


def test_classify_mask_kinds():
    assert classify_mask(None, False) == "none"
    assert classify_mask(None, True) == "causal"
    assert classify_mask(torch.ones(2, 2, dtype=torch.bool), False) == "bool"
    assert classify_mask(torch.zeros(2, 2, dtype=torch.bfloat16), False) == "additive"


@pytest.mark.parametrize(
    "mask, is_causal, message",
    [
        (torch.ones(3, 5, dtype=torch.bool), True, "mutually exclusive"),
        (torch.ones(3, 5, dtype=torch.int64), False, "bool"),
        (torch.ones(4, 5, dtype=torch.bool), False, "not broadcastable"),
        (torch.ones(3, 1, 3, 5, dtype=torch.bool), False, "not broadcastable"),
        (torch.ones(1, 1, 1, 3, 5, dtype=torch.bool), False, "not broadcastable"),
    ],
)
def test_validate_mask_rejects(mask, is_causal, message):
    with pytest.raises(ValueError, match=message):
        validate_mask(mask, is_causal, batch=2, heads=2, q_len=3, kv_len=5)


@pytest.mark.parametrize("shape", [(3, 5), (1, 5), (3, 1), (2, 1, 3, 5), (1, 2, 1, 5), (2, 3, 5)])
def test_validate_mask_accepts_broadcastable(shape):
    assert validate_mask(torch.zeros(shape), False, batch=2, heads=2, q_len=3, kv_len=5) == "additive"


@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape, message",
    [
        ((2, 4, 8), (1, 2, 8, 8), None, "4-D"),
        ((1, 3, 8, 8), (1, 2, 8, 8), None, "multiple"),
        ((1, 4, 8, 8), (1, 2, 8, 16), None, "head_dim"),
        ((1, 4, 8, 8), (1, 2, 8, 8), (1, 2, 9, 8), "does not match"),
        ((1, 4, 0, 8), (1, 2, 8, 8), None, "empty"),
    ],
)
def test_check_qkv_rejects(q_shape, k_shape, v_shape, message):
    v = None if v_shape is None else torch.zeros(v_shape)
    with pytest.raises(ValueError, match=message):
        check_qkv(torch.zeros(q_shape), torch.zeros(k_shape), v)


@settings(max_examples=25, deadline=None)
@given(cases)
def test_mask_bias_reproduces_sdpa(case: Case):
    """softmax(scale * q k^T + mask_bias) v equals SDPA with the same mask (fully masked rows give 0)."""
    q, k, v = make_qkv(case)
    attn_mask, is_causal = make_mask(case)
    group = case.heads // case.kv_heads
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ kr.transpose(-1, -2) * case.dim**-0.5 + dense_bias(
        attn_mask, is_causal, case.q_len, case.kv_len
    )
    out = scores.softmax(-1).nan_to_num(0.0) @ vr
    ref = F.scaled_dot_product_attention(q, kr, vr, attn_mask=attn_mask, is_causal=is_causal)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_mask_bias_out_of_range_positions_are_masked():
    mask = torch.zeros(1, 2, 3, 5)
    bias = mask_bias(
        mask, False, 3, 5, torch.tensor([0, 2, 3, -1]).view(1, 1, 4, 1), torch.arange(7).view(1, 1, 1, 7)
    )
    assert bias.shape == (1, 2, 4, 7)
    assert torch.isfinite(bias[:, :, :2, :5]).all()
    assert torch.isneginf(bias[:, :, 2:]).all() and torch.isneginf(bias[..., 5:]).all()


@settings(max_examples=25, deadline=None)
@given(cases)
def test_allowed_blocks_is_tile_any(case: Case):
    """A (query block, key block) tile is allowed iff it has an unmasked entry (checked tile by tile)."""
    attn_mask, is_causal = make_mask(case)
    b = 16
    allowed = allowed_blocks(attn_mask, is_causal, case.batch, case.heads, case.q_len, case.kv_len, b, "cpu")
    keep = torch.isfinite(dense_bias(attn_mask, is_causal, case.q_len, case.kv_len))
    keep = keep.expand(case.batch, case.heads, case.q_len, case.kv_len)
    nq, nk = -(-case.q_len // b), -(-case.kv_len // b)
    assert allowed.dim() == 4 and allowed.shape[2:] == (nq, nk)
    expanded = allowed.expand(case.batch, case.heads, nq, nk)
    for i in range(nq):
        for j in range(nk):
            assert torch.equal(
                expanded[:, :, i, j], keep[:, :, i * b : (i + 1) * b, j * b : (j + 1) * b].any(-1).any(-1)
            )


@pytest.mark.parametrize("shape", [(64, 64), (2, 1, 64, 64), (1, 3, 64, 64)])
@pytest.mark.parametrize("kind", ["bool", "-inf", "finfo.min bf16"])
def test_exactly_causal_mask_becomes_is_causal(shape, kind, monkeypatch):
    import omnicompile.kernels.masks as masks

    monkeypatch.setattr(masks, "_CAUSAL_CHECK_ELEMENTS", 1000)  # several steps of rows
    causal = torch.ones(64, 64, dtype=torch.bool).tril()
    if kind == "bool":
        mask = causal
    elif kind == "-inf":
        mask = torch.zeros(64, 64).masked_fill(~causal, float("-inf"))
    else:  # transformers' eager mask
        mask = torch.zeros(64, 64, dtype=torch.bfloat16).masked_fill(~causal, torch.finfo(torch.bfloat16).min)
    mask = mask.expand(shape).contiguous()
    assert masks.causal_if_equivalent(mask, False, 64, 64) == (None, True)


def test_other_masks_stay_masks():
    from omnicompile.kernels.masks import causal_if_equivalent

    causal = torch.ones(2, 1, 64, 64, dtype=torch.bool).tril()
    padded = causal.clone()
    padded[1, :, :, :3] = False  # a left-padded row of the batch
    additive = torch.zeros(64, 64).masked_fill(~causal[0, 0], float("-inf"))
    biased = additive.clone()
    biased[5, 2] = -0.5  # a finite bias (ALiBi-like) on a visible entry
    softly_masked = additive.masked_fill(~causal[0, 0], -1e4)  # not low enough to underflow exactly
    for mask, q_len, kv_len in (
        (padded, 64, 64),
        (causal.triu(), 64, 64),
        (torch.ones(1, 1, 1, 64, dtype=torch.bool), 64, 64),  # broadcast along queries
        (biased, 64, 64),
        (softly_masked, 64, 64),
        (causal.to(torch.int8), 64, 64),
        (torch.ones(48, 64, dtype=torch.bool).tril(), 48, 64),  # Sq != Skv
    ):
        assert causal_if_equivalent(mask, False, q_len, kv_len) == (mask, False)
    assert causal_if_equivalent(None, True, 64, 64) == (None, True)


def test_site_records_use_the_kernels_mask_kind():
    """One `MaskKind`: the passes' site records name the masks' kinds that `classify_mask` returns."""
    from omnicompile.kernels import masks
    from omnicompile.passes import MaskKind

    assert MaskKind is masks.MaskKind
