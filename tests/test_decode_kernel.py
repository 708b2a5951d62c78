"""Split-K slim decode kernel (Triton; interpreted on the CPU, see conftest).

Checked against its pure-PyTorch reference.
"""

from __future__ import annotations

import pytest
import torch

from omnicompile.kernels.decode.reference import slim_decode as reference_decode
from omnicompile.kernels.decode.slim_kv import SlimKV
from omnicompile.kernels.decode.triton_decode import slim_decode, supported
from tests.helpers import REL_TOL, rel_error

pytestmark = pytest.mark.interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _random_slim_kv(
    batch: int, kv_heads: int, prompt: int, tail: int, dim: int, dtype: torch.dtype
) -> SlimKV:
    """A slim cache whose heads keep very different numbers of prompt tokens (one keeps none)."""
    k, v = torch.randn(2, batch, kv_heads, prompt + tail, dim, dtype=dtype, device=DEVICE).unbind(0)
    density = torch.rand(batch, kv_heads, 1, device=DEVICE)
    density.view(-1)[0] = 0.0
    keep = torch.rand(batch, kv_heads, prompt, device=DEVICE) < density
    return SlimKV.pack(k[:, :, :prompt], v[:, :, :prompt], keep).append(k[:, :, prompt:], v[:, :, prompt:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("batch", "kv_heads", "group", "n", "dim"),
    # D = 80 padded to 128; D = 256 (Gemma 3) with 4 x 9 = 36 rows: two 32-row tiles.
    [(1, 2, 3, 1, 32), (2, 1, 2, 3, 24), (1, 1, 2, 1, 80), (1, 1, 4, 9, 256)],
)
def test_kernel_matches_reference(dtype, batch, kv_heads, group, n, dim):
    kv = _random_slim_kv(batch, kv_heads, prompt=150, tail=n + 2, dim=dim, dtype=dtype)
    q = torch.randn(batch, kv_heads * group, n, dim, dtype=dtype, device=DEVICE)
    assert supported(q, kv) is None
    out, lse = slim_decode(q, kv, scale=0.3)
    ref_out, ref_lse = reference_decode(q, kv, scale=0.3)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert rel_error(out, ref_out) < REL_TOL[dtype]
    assert torch.allclose(lse, ref_lse, atol=1e-3, rtol=1e-3)


def test_reference_equals_dense_attention_when_everything_is_kept():
    """Keeping every prompt token, the slim cache is a dense cache: SDPA with a bottom-right causal tail."""
    batch, kv_heads, group, prompt, tail, n, dim = 1, 2, 2, 40, 5, 3, 16
    k, v = torch.randn(2, batch, kv_heads, prompt + tail, dim).unbind(0)
    kv = SlimKV.pack(
        k[:, :, :prompt], v[:, :, :prompt], torch.ones(batch, kv_heads, prompt, dtype=torch.bool)
    )
    kv = kv.append(k[:, :, prompt:], v[:, :, prompt:])
    q = torch.randn(batch, kv_heads * group, n, dim)
    visible = torch.ones(n, prompt + tail, dtype=torch.bool).tril(diagonal=prompt + tail - n)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
    out, _ = reference_decode(q, kv)
    assert rel_error(out, dense) < REL_TOL[torch.float32]


def test_supported_names_the_reason():
    kv = _random_slim_kv(1, 1, prompt=8, tail=1, dim=16, dtype=torch.float32)
    assert "dtypes" in supported(torch.randn(1, 1, 1, 16, dtype=torch.float16, device=DEVICE), kv)
    with pytest.raises(ValueError, match="queries need their own"):
        reference_decode(torch.randn(1, 1, 2, 16, device=DEVICE), kv)
