"""Chunked prefill and packed sequences on CUDA (omnicompile.varlen, issue 20): S = 8192 in chunks of
2048, H = 8, Hkv = 2, D = 128, bf16, structured inputs.

Each chunk against its cached prefix (`prefix_causal_attention`: the Triton kernels on the prefix and on
the chunk, merged by lse) equals dense SDPA with the bottom-right causal mask at tau = 1 without query
selection, and the whole prefill in chunks at the default config stays as close to dense as the one-shot
sparse prefill; packed sequences (`varlen_attention`) equal each sequence alone. How to run:
tests/gpu/__init__.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnicompile import OmniSparseConfig
from omnicompile.demos.structured import structured_qkv
from omnicompile.recording import recording
from omnicompile.varlen import bottom_right_causal_mask, prefix_causal_attention, varlen_attention
from tests.gpu import ON_CUDA
from tests.helpers import REL_TOL, rel_error

pytestmark = ON_CUDA

SEQ, CHUNK, HEADS, KV_HEADS, HEAD_DIM = 8192, 2048, 8, 2, 128
EXACT = OmniSparseConfig(tau=1.0, query_selection=False, min_seq_len=1024)
DEFAULT = OmniSparseConfig(min_seq_len=1024)


def _qkv():
    return structured_qkv("mixed", 1, HEADS, KV_HEADS, SEQ, HEAD_DIM, dtype=torch.bfloat16, device="cuda")


def _chunks(q, k, v, config):
    with recording(measure=False) as recorder:
        out = torch.cat(
            [
                prefix_causal_attention(
                    q[:, :, s : s + CHUNK], k[:, :, : s + CHUNK], v[:, :, : s + CHUNK], config
                )
                for s in range(0, SEQ, CHUNK)
            ],
            2,
        )
    return out, {run.decision for run in recorder.runs}


def test_each_chunk_equals_bottom_right_masked_sdpa_at_tau_1():
    q, k, v = _qkv()
    for start in (CHUNK, SEQ - CHUNK):
        end = start + CHUNK
        chunk_q = q[:, :, start:end]
        out = prefix_causal_attention(chunk_q, k[:, :, :end], v[:, :, :end], EXACT)
        mask = bottom_right_causal_mask(CHUNK, end, q.device)
        want = F.scaled_dot_product_attention(
            chunk_q, k[:, :, :end], v[:, :, :end], attn_mask=mask, enable_gqa=True
        )
        assert rel_error(out, want) <= REL_TOL[torch.bfloat16]


def test_prefill_in_chunks_is_as_close_to_dense_as_one_shot():
    q, k, v = _qkv()
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    one_shot = torch.ops.omnisparse.attention(
        q, k, v, None, 0.0, True, None, True, DEFAULT.to_json(), "one_shot", need_lse=False
    )[0]
    chunked, paths = _chunks(q, k, v, DEFAULT)
    assert paths == {"sparse"}
    assert rel_error(chunked, dense) <= 1.25 * rel_error(one_shot, dense) + REL_TOL[torch.bfloat16]


def test_packed_sequences_equal_each_alone():
    q, k, v = _qkv()
    lengths = [3000, 1200, 3992]
    cu = torch.tensor([0, *lengths], device="cuda").cumsum(0)
    tq, tk, tv = (t[0].transpose(0, 1) for t in (q, k, v))  # [T, H, D]
    packed = varlen_attention(tq, tk, tv, cu, cu, DEFAULT)
    for j, n in enumerate(lengths):
        a, b = cu[j].item(), cu[j + 1].item()
        alone = torch.ops.omnisparse.attention(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, 0.0, True, None, True,
            DEFAULT.to_json(), "alone", need_lse=False,
        )[0]  # fmt: skip
        assert torch.equal(packed[a:b], alone[0].transpose(0, 1)), n
