"""The Triton sparse-attention backward against the reference's autograd gradients.

Without CUDA the kernels run under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py sets it
before Triton is imported), at tiny sizes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from omnicompile.kernels.selection.block_selection import BlockSelection
from omnicompile.kernels.selection.transpose import selection_from_block_mask
from omnicompile.kernels.sparse_attention.launch import LaunchConfig
from omnicompile.kernels.sparse_attention.reference import sparse_attention
from omnicompile.kernels.sparse_attention.triton_bwd import sparse_attention_backward, supported

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative Frobenius error of a gradient against the float32 reference on the same inputs, with
# a floor of 0.1 RMS in the denominator: some gradients are exactly 0 (a row with one key has dq = 0).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
MASK_KINDS = ("none", "bool", "float")


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(actual).all(), "non-finite gradient"
    floor = 0.1 * expected.numel() ** 0.5
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(floor)).item()


def _attn_mask(kind: str, heads: int, q_len: int, kv_len: int, gen: torch.Generator) -> torch.Tensor | None:
    """None, a broadcast [Sq, Skv] bool mask or a [1, H, Sq, Skv] additive float mask."""
    if kind == "bool":
        return (torch.rand(q_len, kv_len, generator=gen) < 0.8).to(DEVICE)
    if kind == "float":
        return torch.randn(1, heads, q_len, kv_len, generator=gen).to(DEVICE)
    return None


def _inputs(
    batch: int,
    heads: int,
    kv_heads: int,
    q_len: int,
    kv_len: int,
    dim: int,
    dtype: torch.dtype,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    def rand(h: int, s: int) -> torch.Tensor:
        return torch.randn(batch, h, s, dim, generator=gen).to(DEVICE, dtype)

    return rand(heads, q_len), rand(kv_heads, kv_len), rand(kv_heads, kv_len)


def _reference_grads(q, k, v, selection, attn_mask, is_causal, scale, grad_out, window=None, softcap=None):
    """(out, lse, dq, dk, dv) of the float32 reference on the (upcast) inputs.

    The kernel, like FlashAttention's backward, takes D = rowsum(dO * O) from the output it is handed,
    stored in q's dtype; where dP - D cancels (few keys per row) that rounding alone moves dq and dk
    past the dtype tolerances (fp16 3.8e-3, bf16 4.6e-2 on a one-row case). The expected gradients
    are therefore the exact ones given that stored O: D enters dq and dk only as
    -(D_i) * d lse_i / d(q, k), so adding (D_i - D'_i) * lse_i to the loss, with D' from the rounded O,
    turns the reference's gradients into those given O' (dv does not depend on D).
    """
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    out, lse = sparse_attention(
        q32, k32, v32, selection, attn_mask, is_causal, scale, window=window, softcap=softcap
    )
    grad_out = grad_out.float()
    d_shift = (grad_out * (out - out.to(q.dtype).float())).sum(-1).detach()
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # rows with no key: lse = -inf
    loss = (out * grad_out).sum() + (d_shift * finite_lse).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q32, k32, v32))
    return out.detach(), lse.detach(), dq, dk, dv


def _check_against_reference(
    q,
    k,
    v,
    selection: BlockSelection,
    attn_mask,
    is_causal: bool,
    scale,
    gen,
    launch: LaunchConfig | None = None,
    window: int | None = None,
    softcap: float | None = None,
):
    """Assert the kernel's gradients match the reference's; return (lse, (dq, dk, dv)) of the kernel run."""
    grad_out = torch.randn(q.shape, generator=gen).to(DEVICE, q.dtype)
    out, lse, *expected = _reference_grads(
        q, k, v, selection, attn_mask, is_causal, scale, grad_out, window, softcap
    )
    grads = sparse_attention_backward(
        grad_out, q, k, v, out.to(q.dtype), lse, selection, attn_mask, is_causal, scale,
        window=window, softcap=softcap, launch=launch,
    )  # fmt: skip
    for name, got, want, like in zip("qkv", grads, expected, (q, k, v)):
        assert got.shape == like.shape and got.dtype == like.dtype
        err = _rel_err(got, want)
        assert err < TOLERANCE[q.dtype], f"d{name}: relative error {err:.2e}"
    return lse, grads


def _random_selection(batch, heads, q_len, kv_len, block_size, density, gen) -> BlockSelection:
    nq, nk = -(-q_len // block_size), -(-kv_len // block_size)
    mask = torch.rand(batch, heads, nq, nk, generator=gen) < density
    return selection_from_block_mask(mask.to(DEVICE), block_size, q_len, kv_len)


def _full_selection(batch, heads, q_len, kv_len, block_size) -> BlockSelection:
    return _random_selection(batch, heads, q_len, kv_len, block_size, 2.0, torch.Generator())


@pytest.mark.interpreter
@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2]),
    q_len=st.integers(1, 80),
    kv_len=st.integers(1, 80),
    dim=st.sampled_from([16, 32]),
    block_size=st.sampled_from([16, 32]),
    masking=st.sampled_from(("causal",) + MASK_KINDS),
    density=st.floats(0.2, 1.0),
    dtype=st.sampled_from(DTYPES),
    dkdv_chunk=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 2**31 - 1),
)
# One row over four keys: dP - D cancels, so the rounding of the stored O dominates (see _reference_grads).
@example(
    batch=1,
    kv_heads=1,
    group=1,
    q_len=1,
    kv_len=36,
    dim=32,
    block_size=32,
    masking="none",
    density=0.5,
    dtype=torch.float16,
    dkdv_chunk=None,
    seed=1,
)
@example(
    batch=1,
    kv_heads=1,
    group=1,
    q_len=1,
    kv_len=36,
    dim=32,
    block_size=32,
    masking="none",
    density=0.5,
    dtype=torch.bfloat16,
    dkdv_chunk=None,
    seed=1,
)
def test_gradients_equal_the_reference(
    batch, kv_heads, group, q_len, kv_len, dim, block_size, masking, density, dtype, dkdv_chunk, seed
) -> None:
    gen = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    q, k, v = _inputs(batch, heads, kv_heads, q_len, kv_len, dim, dtype, gen)
    selection = _random_selection(batch, heads, q_len, kv_len, block_size, density, gen)
    attn_mask = _attn_mask(masking, heads, q_len, kv_len, gen)
    tiles = LaunchConfig(dkdv_chunk=dkdv_chunk)
    _check_against_reference(
        q, k, v, selection, attn_mask, masking == "causal", 0.3 if seed % 2 else None, gen, tiles
    )


@pytest.mark.interpreter
@pytest.mark.parametrize("dim", [64, 80, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_equal_the_reference_at_llama_head_dims(dim: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(dim)
    q, k, v = _inputs(1, 4, 2, 45, 70, dim, dtype, gen)
    selection = _random_selection(1, 4, 45, 70, 16, 0.6, gen)
    _check_against_reference(q, k, v, selection, None, True, None, gen)


@pytest.mark.interpreter
def test_fully_masked_rows_get_zero_gradients() -> None:
    gen = torch.Generator().manual_seed(7)
    q, k, v = _inputs(1, 2, 1, 48, 48, 16, torch.float32, gen)
    mask = torch.rand(1, 2, 3, 3, generator=gen) < 0.7
    mask[:, :, 1] = False  # query block 1 selects nothing
    selection = selection_from_block_mask(mask.to(DEVICE), 16, 48, 48)
    attn_mask = torch.ones(48, 48, dtype=torch.bool, device=DEVICE)
    attn_mask[40:] = False  # rows 40.. mask every key
    lse, (dq, _, _) = _check_against_reference(q, k, v, selection, attn_mask, False, None, gen)
    assert torch.isneginf(lse[:, :, 16:32]).all() and torch.isneginf(lse[:, :, 40:]).all()
    assert (dq[:, :, 16:32] == 0).all() and (dq[:, :, 40:] == 0).all()


@pytest.mark.interpreter
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_full_selection_equals_dense_sdpa_gradients(is_causal: bool, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(int(is_causal))
    q, k, v = _inputs(1, 4, 2, 40, 40, 32, dtype, gen)
    grad_out = torch.randn(q.shape, generator=gen).to(DEVICE, dtype)
    selection = _full_selection(1, 4, 40, 40, 16)
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    dense = F.scaled_dot_product_attention(q32, k32, v32, is_causal=is_causal, enable_gqa=True)
    expected = torch.autograd.grad(dense, (q32, k32, v32), grad_out.float())
    _, lse = sparse_attention(q32.detach(), k32.detach(), v32.detach(), selection, None, is_causal, None)
    grads = sparse_attention_backward(
        grad_out, q, k, v, dense.detach().to(dtype), lse, selection, None, is_causal, None
    )
    for got, want in zip(grads, expected):
        assert _rel_err(got, want) < TOLERANCE[dtype]


@pytest.mark.parametrize("masking", ("causal",) + MASK_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_with_full_selection_has_dense_sdpa_gradients(masking: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(len(masking))
    q, k, v = (t.cpu() for t in _inputs(1, 4, 2, 70, 90, 32, dtype, gen))
    attn_mask = _attn_mask(masking, 4, 70, 90, gen)
    if attn_mask is not None:
        attn_mask = attn_mask.cpu()
        if masking == "bool":
            attn_mask[:, 0] = True  # SDPA gives NaN on fully masked rows; the reference gives 0
    is_causal = masking == "causal"
    selection = selection_from_block_mask(torch.ones(1, 4, 5, 6, dtype=torch.bool), 16, 70, 90)
    grad_out = torch.randn(q.shape, generator=gen, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = sparse_attention(*leaves, selection, attn_mask, is_causal, None)
    got = torch.autograd.grad(out, leaves, grad_out)
    up = [t.double().requires_grad_() for t in (q, k, v)]
    mask64 = attn_mask.double() if masking == "float" else attn_mask
    dense = F.scaled_dot_product_attention(*up, attn_mask=mask64, is_causal=is_causal, enable_gqa=True)
    want = torch.autograd.grad(dense, up, grad_out.double())
    for g, w, like in zip(got, want, (q, k, v)):
        assert g.dtype == like.dtype
        assert _rel_err(g, w) < TOLERANCE[dtype]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masking", ["none", "causal", "window", "bool", "float"])
def test_softcap_gradients_equal_the_reference(dtype: torch.dtype, masking: str) -> None:
    """Scores spread over +-8 capped at 2: d tanh vanishes where it saturates; chunked dk/dv lists."""
    gen = torch.Generator().manual_seed(len(masking) + DTYPES.index(dtype))
    q, k, v = _inputs(1, 4, 2, 40, 50, 32, dtype, gen)
    selection = _random_selection(1, 4, 40, 50, 16, 0.7, gen)
    causal, window = masking in ("causal", "window"), 12 if masking == "window" else None
    attn_mask = None if causal else _attn_mask(masking, 4, 40, 50, gen)
    _check_against_reference(
        q, k, v, selection, attn_mask, causal, 1.5, gen, LaunchConfig(dkdv_chunk=2), window, softcap=2.0
    )


def test_supported_names_what_it_cannot_run() -> None:
    q = torch.randn(1, 2, 8, 40, device=DEVICE)
    assert "head dim" in supported(q, q, q, None)
    q = torch.randn(1, 2, 8, 272, device=DEVICE)
    assert "head dim" in supported(q, q, q, None)
    q = torch.randn(1, 3, 8, 16, device=DEVICE)
    k = torch.randn(1, 2, 8, 16, device=DEVICE)
    assert "multiple" in supported(q, k, k, None)
    assert "attn_mask dtype" in supported(q, q, q, torch.ones(8, 8, dtype=torch.int64, device=DEVICE))
    assert supported(q, q, q, torch.ones(8, 8, dtype=torch.bool, device=DEVICE)) is None


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dkdv_chunk", [None, 1])
@pytest.mark.parametrize(
    "q_len, kv_len, window", [(64, 64, 16), (70, 70, 10), (80, 58, 26), (48, 80, 40), (50, 50, 64)]
)
def test_window_gradients_equal_the_reference(dtype, dkdv_chunk, q_len, kv_len, window) -> None:
    """Sliding windows that are and are not multiples of the block (16), window >= S (causal);
    random selections, so blocks outside the band and on its edge are both exercised."""
    gen = torch.Generator().manual_seed(q_len + window)
    q, k, v = _inputs(1, 4, 2, q_len, kv_len, 16, dtype, gen)
    selection = _random_selection(1, 4, q_len, kv_len, 16, 0.8, gen)
    tiles = LaunchConfig(dq_block_n=16, dkdv_block_m=16, dkdv_chunk=dkdv_chunk)
    _check_against_reference(q, k, v, selection, None, True, None, gen, tiles, window=window)


@pytest.mark.interpreter
@pytest.mark.parametrize("dim, window", [(80, None), (256, None), (256, 20)])
def test_gradients_at_head_dims_80_and_256(dim: int, window: int | None) -> None:
    gen = torch.Generator().manual_seed(dim)
    q, k, v = _inputs(1, 2, 1, 40, 40, dim, torch.bfloat16, gen)
    selection = _random_selection(1, 2, 40, 40, 16, 0.7, gen)
    _check_against_reference(q, k, v, selection, None, True, None, gen, window=window)


@pytest.mark.interpreter
def test_finfo_min_mask_gradients_equal_the_reference() -> None:
    """transformers' additive masks: 0 / finfo.min, with fully masked rows (gradients 0, as -inf)."""
    gen = torch.Generator().manual_seed(9)
    q, k, v = _inputs(1, 2, 2, 40, 40, 16, torch.float16, gen)
    keep = torch.rand(40, 40, generator=gen) < 0.4
    keep[3] = False
    mask = torch.zeros(40, 40, dtype=torch.float16).masked_fill(~keep, torch.finfo(torch.float16).min)
    lse, grads = _check_against_reference(
        q, k, v, _full_selection(1, 2, 40, 40, 16), mask.to(DEVICE), False, None, gen
    )
    assert torch.isneginf(lse[:, :, 3]).all() and (grads[0][:, :, 3] == 0).all()
