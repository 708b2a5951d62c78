"""The online-softmax primitives of kernels/triton_utils.py against plain torch math (interpreter)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from omnicompile.kernels.triton_utils import LOG2E, score_constexprs, softmax_finish, softmax_step

pytestmark = pytest.mark.interpreter


@triton.jit
def _softmax_kernel(S, V, O, LSE, scale, ROWS: tl.constexpr, KEYS: tl.constexpr, D: tl.constexpr,
                    TILE: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """Attention of ROWS rows over KEYS keys in tiles of TILE: scores S [ROWS, KEYS] (natural units,
    -inf masked when MASKED), values V [KEYS, D] -> O [ROWS, D], LSE [ROWS]."""
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, D)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, D], dtype=tl.float32)
    for k0 in tl.static_range(0, KEYS, TILE):
        keys = k0 + tl.arange(0, TILE)
        s = tl.load(S + rows[:, None] * KEYS + keys[None, :])
        v = tl.load(V + keys[:, None] * D + cols[None, :])
        if MASKED:
            m_i, p, alpha = softmax_step(m_i, s * scale, 1.0, True)
        else:
            m_i, p, alpha = softmax_step(m_i, s, scale, False)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], 1)
    out, lse = softmax_finish(acc, m_i, l_i)
    tl.store(O + rows[:, None] * D + cols[None, :], out)
    tl.store(LSE + rows, lse)


@pytest.mark.parametrize("masked", [False, True])
def test_softmax_step_and_finish_match_torch(masked: bool) -> None:
    rows, keys, dim, tile = 16, 64, 16, 16
    gen = torch.Generator().manual_seed(7)
    scores = torch.randn(rows, keys, generator=gen) * 4
    values = torch.randn(keys, dim, generator=gen)
    if masked:
        keep = torch.rand(rows, keys, generator=gen) > 0.5
        keep[:, :tile] = False  # every row's first tile is fully masked
        keep[3] = False  # a row that sees no key
        keep[5, -1] = True  # a row that sees one key, in its last tile
        keep[5, :-1] = False
        scores = scores.masked_fill(~keep, float("-inf"))
    out = torch.empty(rows, dim)
    lse = torch.empty(rows)
    _softmax_kernel[(1,)](scores, values, out, lse, LOG2E, rows, keys, dim, tile, masked)

    lse_ref = torch.logsumexp(scores, -1)
    seen = torch.isfinite(lse_ref)
    out_ref = torch.where(seen[:, None], torch.softmax(scores, -1).nan_to_num() @ values, 0.0)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-5, atol=1e-5)
    if masked:
        assert lse[3] == float("-inf") and out[3].eq(0).all()


def test_score_constexprs() -> None:
    q = torch.zeros(1, 2, 3, 80, dtype=torch.float16)
    assert score_constexprs(q, True, 16, None) == {
        "HEAD_DIM": 80,
        "HEAD_DIM_PAD": 128,
        "IS_CAUSAL": True,
        "WINDOWED": True,
        "SOFTCAP": False,
        "FP32_DOT": False,
    }
    assert score_constexprs(q.float(), False, None, 30.0)["FP32_DOT"] is True
