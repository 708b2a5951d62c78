"""Attention inputs with known structure, for tests, benchmarks and the demo.

``structured_qkv`` builds q, k, v whose exact attention (SDPA scale 1/sqrt(D)) has the patterns
sparse attention exploits, each placed exactly, without any [S, S] tensor (memory O(B H S D)):

- sinks: the first ``sink_tokens`` keys, strong for every query;
- local windows: a query attends to the keys within about ``window`` tokens of it at full logit,
  ramping linearly to nothing at two windows (future keys too, when not causal);
- slashes: the same pattern repeated at offsets that are multiples of ``slash_period`` (diagonals),
  fading after about ``slashes`` of them;
- vertical stripes: ``stripes`` spans of ``stripe_width`` keys per KV head seen by every query;
- needles: per KV head, ``needles`` key spans of ``needle_len`` tokens, each retrieved by one
  ``needle_len``-token query span per query head, placed after the key span, at any distance.

Construction, in logit units (scale * q . k; q and k are multiplied by D**0.25 at the end). Dim 0 is
a global direction: sink and stripe keys carry their logit there and queries a per-head gain near 1.
Positional keys carry a position code: with u = (position + phase) / window, the linear
interpolation (1 - frac u) e_floor(u) + (frac u) e_floor(u)+1 of one-hot codes, cyclic with
C = slash_period / window codes. A query at u carries ``strength`` times the sum of the key codes at
u - 1, u and u + 1, so its logit is a smooth (piecewise-linear) function of the key's position,
``strength`` near the diagonal; the cyclic codes repeat it every slash_period tokens: the slashes.
A bank of cos/sin pairs with periods 4 * (slashes + 1) * slash_period * 2^m (m = 0, 1, ... until
>= 2 S) adds a distance decay, in units of ``decay`` logits: smooth near the diagonal; for slashes = 2,
0.18, 0.68, 1.4, 2.2, 2.9 at slashes 1 to 5 and >= 3 from 6 slash periods on.
Needle keys and query spans share a needle dim. Structural keys (sinks, stripes, needle keys) carry
no positional code, hence no distance decay. Remaining dims (>= 4) hold Gaussian content noise of
``noise`` logits std. Codes are exactly orthogonal: no cross-talk between them. Positional peak
P = strength + decay * (number of pairs); sinks reach P + 2, needles P + 1, stripes P - 1, each
query-head component scaled by a per-head gain in [0.9, 1.1]. Structure is shared over the batch;
noise and v are not.

Presets:
- ``"structured"``: all of the above.
- ``"flat_head"``: ``"structured"``, except that the last query head of the layer (head H - 1, in the
  last KV group) has a content-noise query only: near-flat attention. The input of the budget-scope
  ablation: under ``budget_scope="heads"`` that one head inflates every head's budget.
- ``"mixed"``: ``"structured"`` with heads that differ in breadth, as a trained model's do: each query
  head's logits are scaled by its own sharpness, log-uniform in [0.15, 1.5] (seeded), so some heads
  are local and sharp and others spread their mass over many blocks. Observed per-head oracle
  density (95% exact mass, causal, b = 64, S = 8192, 8 heads / 2 KV heads, seed 0): 0.16-0.56, mean
  0.27 (``"structured"``: 0.13-0.20): a budget shared by all heads costs about twice the per-head one.
- ``"mixed_flat"``: ``"mixed"`` with every 8th query head (7, 15, ...) near-flat (sharpness 0.02).
- ``"random"``: q, k, v i.i.d. standard normal: scores ~ N(0, 1), nearly flat attention with no
  structure. The honest worst case for any sparse method: no small set of blocks holds most mass.

Deterministic given ``seed`` and device (draws use a generator on ``device``). Measured: 131072 tokens,
32 heads / 8 KV heads, D = 128, bf16 on one H100: 0.7 s, peak 6.9 GiB (fp32 intermediates).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Preset = Literal["structured", "flat_head", "mixed", "mixed_flat", "random"]
PRESETS: tuple[str, ...] = ("structured", "flat_head", "mixed", "mixed_flat", "random")


def _cos_sin(positions: torch.Tensor, periods: torch.Tensor) -> torch.Tensor:
    """[S, 2 * len(periods)] cos/sin of 2 pi positions / periods (angles in float64)."""
    angle = 2 * math.pi * positions.double()[:, None] / periods.double()[None, :]
    return torch.cat([angle.cos(), angle.sin()], dim=-1).float()


def _interpolated_code(u: torch.Tensor, codes: int) -> torch.Tensor:
    """float32 [..., codes]: linear interpolation of the cyclic one-hot codes of floor(u) and floor(u) + 1."""
    cell = u.floor()
    frac = (u - cell).float()[..., None]
    cell = cell.long()
    one_hot = torch.nn.functional.one_hot
    return (1 - frac) * one_hot(cell % codes, codes) + frac * one_hot((cell + 1) % codes, codes)


_LEAST_SHARP = 0.1  # sharpness range of the mixed presets: [0.1, 1] x _SHARPEST
_SHARPEST = 1.5
_FLAT_EVERY = 8  # mixed_flat: every 8th query head is near-flat ...
_FLAT_SHARPNESS = 0.02  # ... its logits scaled by 0.02


def _breadth(preset: str, heads: int, uniform) -> torch.Tensor:
    """float32 [H]: per-query-head sharpness of the ``mixed`` presets (module docstring)."""
    sharpness = _SHARPEST * _LEAST_SHARP ** uniform(heads)  # log-uniform in [0.15, 1.5]
    if preset == "mixed_flat":
        sharpness[_FLAT_EVERY - 1 :: _FLAT_EVERY] = _FLAT_SHARPNESS
    return sharpness


def structured_qkv(
    preset: Preset,
    batch: int,
    heads: int,
    kv_heads: int,
    seq_len: int,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    window: int = 64,
    slash_period: int = 1024,
    slashes: int = 2,
    sink_tokens: int = 4,
    stripes: int = 8,
    stripe_width: int = 32,
    needles: int = 4,
    needle_len: int = 64,
    strength: float = 12.0,
    decay: float = 3.0,
    noise: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, H, S, D], k and v [B, Hkv, S, D] in ``dtype`` on ``device`` (module docstring).

    Raises ``ValueError`` when head_dim cannot hold the codes (1 + 2 * decay pairs +
    slash_period / window + needles dims, plus >= 4 noise dims), slash_period is not a multiple
    >= 6 of window (the window must not overlap its own slash), or the preset is unknown.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: expected one of {PRESETS}")
    if heads % kv_heads:
        raise ValueError(f"heads {heads} are not a multiple of kv_heads {kv_heads}")
    gen = torch.Generator(device=device).manual_seed(seed)
    v = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen, device=device).to(dtype)
    if preset == "random":
        q = torch.randn(batch, heads, seq_len, head_dim, generator=gen, device=device)
        k = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen, device=device)
        return q.to(dtype), k.to(dtype), v
    if slash_period % window or slash_period // window < 6:
        raise ValueError(f"slash_period {slash_period} must be a multiple >= 6 of window {window}")
    codes = slash_period // window
    base = 4 * (slashes + 1) * slash_period
    pairs = max(1, math.ceil(math.log2(max(2 * seq_len / base, 1))) + 1)
    code_dims = 1 + 2 * pairs + codes + needles
    noise_dims = head_dim - code_dims
    if noise_dims < 4:
        raise ValueError(f"head_dim {head_dim} cannot hold {code_dims} code dims and >= 4 noise dims")
    peak = strength + decay * pairs
    group = heads // kv_heads
    pos = torch.arange(seq_len, device=device)

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, device=device)

    def starts(count: int, low: int, high: int, rows: int) -> torch.Tensor:
        """Random int64 [rows, count] in [low, max(high, low + 1))."""
        return low + (uniform(rows, count) * max(high - low, 1)).long()

    # Keys [Hkv, S, code_dims]: global | decay pairs | position codes | needle codes.
    key = torch.zeros(kv_heads, seq_len, code_dims, device=device)
    structural = torch.zeros(kv_heads, seq_len, dtype=torch.bool, device=device)
    key[:, :sink_tokens, 0] = peak + 2
    stripe_pos = starts(stripes, sink_tokens, seq_len - stripe_width, kv_heads)[..., None] + torch.arange(
        stripe_width, device=device
    )
    stripe_pos = stripe_pos.clamp(max=seq_len - 1).flatten(1)
    key[:, :, 0].scatter_(1, stripe_pos, peak - 1)
    needle_keys = starts(needles, 0, seq_len - needle_len, kv_heads)
    needle_pos = (needle_keys[..., None] + torch.arange(needle_len, device=device)).clamp(max=seq_len - 1)
    for n in range(needles):
        key[:, :, code_dims - needles + n].scatter_(1, needle_pos[:, n], 1.0)
    structural[:, :sink_tokens] = True
    structural.scatter_(1, stripe_pos, True)
    structural.scatter_(1, needle_pos.flatten(1), True)
    periods = base * 2.0 ** torch.arange(pairs, device=device)
    phase = starts(1, 0, window, kv_heads)  # [Hkv, 1]: code grid offset per KV head
    u = (pos[None, :] + phase).double() / window  # [Hkv, S], position in windows
    positional = torch.cat(
        [
            math.sqrt(decay) * _cos_sin(pos, periods).expand(kv_heads, -1, -1),
            math.sqrt(strength) * _interpolated_code(u, codes),
        ],
        dim=-1,
    )
    key[:, :, 1 : 1 + 2 * pairs + codes] = positional * ~structural[..., None]

    # Queries [H, S, code_dims], each component scaled by a per-head gain in [0.9, 1.1].
    gain = 0.9 + 0.2 * uniform(heads, 3)
    kv_of = torch.arange(heads, device=device) // group
    query = torch.zeros(heads, seq_len, code_dims, device=device)
    query[:, :, 0] = gain[:, 0:1]
    query_u = u[kv_of]
    query[:, :, 1 : 1 + 2 * pairs] = math.sqrt(decay) * _cos_sin(pos, periods) * gain[:, 1, None, None]
    query[:, :, 1 + 2 * pairs : 1 + 2 * pairs + codes] = (
        math.sqrt(strength)
        * gain[:, 1, None, None]
        * sum(_interpolated_code(query_u + t, codes) for t in (-1, 0, 1))
    )
    # Each query span starts after its key span ends (visible under causal masking when there is room).
    after_key = needle_keys[kv_of] + needle_len
    needle_queries = (
        after_key + (uniform(heads, needles) * (seq_len - needle_len - after_key).clamp(min=1)).long()
    )
    query_pos = (needle_queries[..., None] + torch.arange(needle_len, device=device)).clamp(max=seq_len - 1)
    for n in range(needles):
        query[:, :, code_dims - needles + n].scatter_(1, query_pos[:, n], 1.0)
    query[:, :, code_dims - needles :] *= (peak + 1) * gain[:, 2, None, None]
    if preset == "flat_head":
        query[-1] = 0.0
    if preset in ("mixed", "mixed_flat"):
        query *= _breadth(preset, heads, uniform)[:, None, None]

    noise_std = math.sqrt(noise) / noise_dims**0.25
    root = head_dim**0.25
    q_noise = noise_std * torch.randn(batch, heads, seq_len, noise_dims, generator=gen, device=device)
    k_noise = noise_std * torch.randn(batch, kv_heads, seq_len, noise_dims, generator=gen, device=device)
    q = torch.cat([query.expand(batch, -1, -1, -1), q_noise], dim=-1) * root
    k = torch.cat([key.expand(batch, -1, -1, -1), k_noise], dim=-1) * root
    return q.to(dtype), k.to(dtype), v
