"""The fused Triton composite / pooled estimator equals the pure-PyTorch reference estimator.

Runs under the Triton interpreter on the CPU (tests/conftest.py), tiny shapes: causal and not, GQA,
partial last blocks and groups, Sq != Skv, small tiles (several query tiles, interior and boundary
key tiles), random and structured inputs, a logit soft-cap.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnicompile.config import OmniSparseConfig
from omnicompile.demos.structured import structured_qkv
from omnicompile.kernels.estimation.launch import LaunchConfig
from omnicompile.kernels.estimation.reference import composite_means
from omnicompile.kernels.estimation.reference import estimate_blocks as reference_estimate
from omnicompile.kernels.estimation.triton_composite import estimate_blocks, supported
from omnicompile.kernels.masks import allowed_blocks
from omnicompile.method import estimation_params
from tests.helpers import rel_error, stable_seed

pytestmark = pytest.mark.interpreter

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# ||Ahat - ref|| / ||ref||: exact fp32 math for fp32; bf16/fp16 round the composite means.
AHAT_REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SMALL_TILES = LaunchConfig(block_u=16, block_w=16, num_warps=4, num_stages=1)


def _qk(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype, gen, std=2.0):
    q = (std * torch.randn(batch, heads, q_len, head_dim, generator=gen)).to(dtype)
    k = (std * torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen)).to(dtype)
    return q, k


def _check(q, k, is_causal, config, launch=None, window=None, softcap=None):
    scale = q.shape[-1] ** -0.5
    params = estimation_params(config)
    ahat = estimate_blocks(
        q, k, None, is_causal, scale, params, window=window, softcap=softcap, launch=launch
    )
    ref = reference_estimate(q, k, None, is_causal, scale, params, window=window, softcap=softcap)
    assert ahat.shape == ref.shape and ahat.dtype == torch.float32
    assert rel_error(ahat, ref) < AHAT_REL_TOL[q.dtype]
    batch, heads, q_len, _ = q.shape
    allowed = allowed_blocks(
        None, is_causal, batch, heads, q_len, k.shape[2], config.block_size, q.device, window=window
    )
    assert torch.all(ahat.masked_fill(allowed, 0.0) == 0)  # exactly zero on disallowed blocks
    assert torch.allclose(ahat.sum(-1), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("estimator", ["composite", "pooled"])
@pytest.mark.parametrize(
    "shape",
    [
        (1, 2, 2, 128, 128, 32),  # B, H, Hkv, Sq, Skv, D
        (2, 4, 2, 150, 90, 48),  # GQA, Sq > Skv, partial blocks and groups, padded head dim
        (1, 3, 1, 70, 130, 32),  # MQA, Sq < Skv
    ],
)
def test_matches_reference(dtype, is_causal, estimator, shape):
    gen = torch.Generator().manual_seed(stable_seed(str(dtype), is_causal, estimator, shape))
    q, k = _qk(*shape, dtype, gen)
    config = OmniSparseConfig(estimator=estimator, block_size=16, granularity=4)
    _check(q, k, is_causal, config, launch=SMALL_TILES)


@pytest.mark.parametrize("is_causal", [True, False])
def test_default_launch(is_causal):
    gen = torch.Generator().manual_seed(1)
    q, k = _qk(1, 4, 2, 300, 300, 64, torch.bfloat16, gen)
    _check(q, k, is_causal, OmniSparseConfig(block_size=64, granularity=16))


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2, 3]),
    q_len=st.integers(1, 120),
    kv_len=st.integers(1, 120),
    block_and_granularity=st.sampled_from([(16, 4), (16, 16), (32, 4), (16, 2)]),
    is_causal=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_property(
    batch, kv_heads, group, q_len, kv_len, block_and_granularity, is_causal, seed
):
    gen = torch.Generator().manual_seed(seed)
    q, k = _qk(batch, kv_heads * group, kv_heads, q_len, kv_len, 16, torch.float32, gen)
    block, granularity = block_and_granularity
    config = OmniSparseConfig(block_size=block, granularity=granularity)
    _check(q, k, is_causal, config, launch=SMALL_TILES)


@pytest.mark.parametrize("preset", ["structured", "flat_head"])
def test_structured_inputs(preset):
    """Sharp structure (sinks, windows, needles): logits far larger than random inputs'."""
    q, k, _ = structured_qkv(
        preset, 1, 4, 2, 256, 64, dtype=torch.bfloat16, seed=2, window=16, slash_period=96
    )
    _check(q, k, True, OmniSparseConfig(block_size=32, granularity=8), launch=SMALL_TILES)


def test_default_scale():
    gen = torch.Generator().manual_seed(4)
    q, k = _qk(1, 2, 1, 64, 64, 32, torch.float32, gen)
    config = OmniSparseConfig(block_size=16, granularity=4)
    assert torch.equal(
        estimate_blocks(q, k, None, True, None, estimation_params(config)),
        estimate_blocks(q, k, None, True, 32**-0.5, estimation_params(config)),
    )


def test_composite_means():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 37, 16, generator=gen)
    means = composite_means(x, 8)
    assert means.shape == (2, 3, 5, 16)
    assert torch.allclose(means[:, :, 1], x[:, :, 8:16].mean(2))
    assert torch.allclose(means[:, :, 4], x[:, :, 32:].mean(2))


def test_supported_reasons(monkeypatch):
    q, k = torch.zeros(1, 4, 8, 64), torch.zeros(1, 2, 8, 64)
    config = OmniSparseConfig()
    assert supported(q, k, None, estimation_params(config)) is None
    assert "antidiagonal" in supported(
        q, k, None, estimation_params(config.replace(estimator="antidiagonal"))
    )
    assert "attn_mask" in supported(q, k, torch.ones(8, 8, dtype=torch.bool), estimation_params(config))
    assert "head dim" in supported(q[..., :40], k[..., :40], None, estimation_params(config))
    assert (
        supported(torch.zeros(1, 4, 8, 256), torch.zeros(1, 2, 8, 256), None, estimation_params(config))
        is None
    )
    assert "head dim" in supported(
        torch.zeros(1, 4, 8, 272), torch.zeros(1, 2, 8, 272), None, estimation_params(config)
    )
    assert "dtypes" in supported(q, k.half(), None, estimation_params(config))
    with pytest.raises(ValueError, match="antidiagonal"):
        estimate_blocks(q, k, None, True, 0.125, estimation_params(config.replace(estimator="antidiagonal")))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "CUDA" in supported(q, k, None, estimation_params(config))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("estimator", ["composite", "pooled"])
@pytest.mark.parametrize(
    "q_len, kv_len, window",
    # windows that are and are not multiples of the block (16) and of the group (4), Sq != Skv,
    # window >= S (plain causal)
    [(256, 256, 32), (250, 250, 37), (200, 150, 70), (120, 250, 64), (100, 100, 128)],
)
def test_window_matches_reference(dtype, estimator, q_len, kv_len, window):
    """Small tiles (16 composites), so tiles below the band, on its edge, interior and diagonal occur."""
    gen = torch.Generator().manual_seed(q_len + window)
    q, k = _qk(1, 2, 1, q_len, kv_len, 16, dtype, gen)
    config = OmniSparseConfig(block_size=16, granularity=4, estimator=estimator)
    _check(q, k, True, config, launch=SMALL_TILES, window=window)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator", ["composite", "pooled"])
@pytest.mark.parametrize(("is_causal", "window"), [(False, None), (True, None), (True, 37)])
def test_softcap_matches_reference(dtype, estimator, is_causal, window):
    """Composite scores capped at 1 (they spread over about +-6 here); small tiles, row probe on."""
    gen = torch.Generator().manual_seed(stable_seed(str(dtype), estimator, window))
    q, k = _qk(1, 2, 1, 150, 130, 16, dtype, gen, std=4.0)
    config = OmniSparseConfig(block_size=16, granularity=4, estimator=estimator, row_probe=True)
    _check(q, k, is_causal, config, launch=SMALL_TILES, window=window, softcap=1.0)


@pytest.mark.parametrize("head_dim, window", [(80, None), (256, None), (256, 40)])
def test_head_dims_80_and_256(head_dim, window):
    gen = torch.Generator().manual_seed(head_dim)
    q, k = _qk(1, 2, 1, 96, 96, head_dim, torch.bfloat16, gen, std=1.0)
    _check(q, k, True, OmniSparseConfig(block_size=16, granularity=4), window=window)
