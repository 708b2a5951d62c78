"""The op's log-sum-exp and `merge_attention` on CUDA at a realistic size (issue 20): S = 8192, H = 8,
Hkv = 2, D = 128, bf16, structured inputs.

The keys split into halves [0, S/2) and [S/2, S), each half run through the op with its causal (or
sliding-window) entries as a bool mask; `merge_attention` of the two equals the op over all keys, in
dense mode (SDPA and `dense.dense_lse`; a window site: the Triton band kernel) and in sparse mode at
tau = 1 without query selection (every allowed block). The whole's lse also equals the fp32
log-sum-exp of the explicit scores. How to run: tests/gpu/__init__.py.
"""

from __future__ import annotations

import pytest
import torch

from omnicompile import OmniSparseConfig, merge_attention
from omnicompile.demos.structured import structured_qkv
from omnicompile.kernels.masks import window_mask
from omnicompile.recording import recording
from tests.gpu import ON_CUDA
from tests.helpers import REL_TOL, rel_error

pytestmark = ON_CUDA

SEQ, HEADS, KV_HEADS, HEAD_DIM, WINDOW = 8192, 8, 2, 128, 2048
LSE_ATOL = 5e-3  # bf16 inputs, fp32 lse: the kernels' and SDPA's rounding differ, not the math
MODES = {
    "dense": OmniSparseConfig(mode="dense"),
    "sparse_tau_1": OmniSparseConfig(tau=1.0, query_selection=False, min_seq_len=1024),
}


def _op(q, k, v, mask, window, config):
    """(out, lse, path) of the op; ``window`` means causal with that window, no mask means causal."""
    with recording(measure=False) as recorder:
        out, lse = torch.ops.omnisparse.attention(
            q, k, v, mask, 0.0, mask is None, None, True, config.to_json(), "merge", window
        )
    return out, lse, recorder.runs[0].decision


def _explicit_lse(q, k, keep):
    """fp32 logsumexp of the scaled scores where ``keep`` [S, S], one head at a time."""
    group = q.shape[1] // k.shape[1]
    rows = []
    for h in range(q.shape[1]):
        scores = (q[0, h].float() @ k[0, h // group].float().T) * HEAD_DIM**-0.5
        rows.append(torch.logsumexp(scores.masked_fill(~keep, float("-inf")), -1))
    return torch.stack(rows)[None]


@pytest.mark.parametrize("window", [None, WINDOW], ids=["causal", f"window{WINDOW}"])
@pytest.mark.parametrize("mode", list(MODES))
def test_merging_two_halves_equals_the_whole(mode, window):
    q, k, v = structured_qkv(
        "structured", 1, HEADS, KV_HEADS, SEQ, HEAD_DIM, dtype=torch.bfloat16, device="cuda"
    )
    config = MODES[mode]
    keep = window_mask(SEQ, SEQ, window or SEQ, q.device)
    out, lse, path = _op(q, k, v, None, window, config)
    assert path == ("dense" if mode == "dense" else "sparse")
    assert (lse - _explicit_lse(q, k, keep)).abs().max().item() < LSE_ATOL
    halves = (slice(0, SEQ // 2), slice(SEQ // 2, SEQ))
    parts = [_op(q, k[:, :, keys], v[:, :, keys], keep[:, keys], None, config)[:2] for keys in halves]
    merged_out, merged_lse = merge_attention(*zip(*parts))
    assert merged_out.dtype == torch.bfloat16
    assert torch.equal(torch.isfinite(merged_lse), torch.isfinite(lse))
    assert (merged_lse - lse).abs().max().item() < LSE_ATOL
    assert rel_error(merged_out, out) < REL_TOL[torch.bfloat16]
