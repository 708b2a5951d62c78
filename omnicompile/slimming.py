"""Decode KV cache slimming by head-level decoding pattern (METHOD.md section 4), as pure functions.

Definitions this module fixes (the page leaves them open):
- Observation: the last ``w = min(obs_window, S)`` prompt queries; query r sits at position S - w + r and
  sees keys <= S - w + r (causal). Per query head, its exact softmax attention (fp32) is averaged over the
  w queries, a distribution over the S prompt keys; per KV head the *observed attention* is the
  elementwise max over the G query heads of its group (so it sums to >= 1).
- Long-range region R: the marked tokens (visual spans / a token-type mask; all tokens when nothing is
  marked) minus the sink (first ``n_sink * block_size`` tokens) and the recent window (last
  ``recent_window`` tokens): sink and recent tokens are never dropped.
- Observed mass on R of a KV head: the sum of its observed attention over R. Below ``head_mass_eps`` the
  head is *local* and keeps every token outside R; otherwise it is a *retrieval* head and keeps, besides
  every token outside R, the R tokens of the `SLIM_BLOCK`-token blocks (aligned to absolute positions)
  of highest observed mass on R, taken in descending order until their mass reaches ``tau_decode`` of the
  head's mass on R. ``tau_decode = 1`` keeps every block of R by definition (no float comparison), so
  ``head_mass_eps = 0`` with ``tau_decode = 1`` keeps everything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import OmniSparseConfig

SLIM_BLOCK = 16  # tokens per block of the long-range region (METHOD.md section 4)


@dataclass(frozen=True)
class SlimPlan:
    """What each KV head keeps of an S-token prompt.

    Attributes:
        keep: bool [B, Hkv, S], True where the head keeps the token.
        region: bool [B, S], the long-range region R.
        mass_on_region: float32 [B, Hkv], observed mass on R.
        local_heads: bool [B, Hkv], heads classified local (mass on R < head_mass_eps).
    """

    keep: Tensor
    region: Tensor
    mass_on_region: Tensor
    local_heads: Tensor

    @property
    def kept_lengths(self) -> Tensor:
        """int64 [B, Hkv]: tokens kept per (batch row, KV head)."""
        return self.keep.sum(-1)

    def kept_indices(self, batch: int, head: int) -> Tensor:
        """int64 [kept]: ascending positions kept by KV head ``head`` of batch row ``batch``."""
        return self.keep[batch, head].nonzero().flatten()


def long_range_region(
    seq_len: int,
    config: OmniSparseConfig,
    token_mask: Tensor | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """bool [B or 1, S]: the long-range region R of an S-token prompt.

    Args:
        token_mask: optional bool [S] or [B, S] marking the visual tokens; exclusive with
            ``config.visual_spans``.
    """
    if token_mask is not None and config.visual_spans is not None:
        raise ValueError(
            "slimming: give the visual tokens either as config.visual_spans or as a token mask, not both"
        )
    if token_mask is not None:
        if (
            token_mask.dtype != torch.bool
            or token_mask.shape[-1] != seq_len
            or token_mask.dim() not in (1, 2)
        ):
            raise ValueError(
                f"slimming: the token mask must be bool [S] or [B, S] with S = {seq_len}, got "
                f"{token_mask.dtype} {tuple(token_mask.shape)}"
            )
        marked = token_mask.to(device).view(-1, seq_len)
    elif config.visual_spans is not None:
        marked = torch.zeros(1, seq_len, dtype=torch.bool, device=device)
        for start, end in config.visual_spans:
            marked[:, start:end] = True
    else:
        marked = torch.ones(1, seq_len, dtype=torch.bool, device=device)
    positions = torch.arange(seq_len, device=device)
    outside = (positions >= config.n_sink * config.block_size) & (positions < seq_len - config.recent_window)
    return marked & outside


def observed_attention(q_obs: Tensor, k: Tensor, scale: float) -> Tensor:
    """float32 [B, Hkv, S]: observed attention of the last prompt queries, max-pooled per KV head.

    Args:
        q_obs: [B, H, w, D], the queries of the last w prompt positions (w <= S).
        k: [B, Hkv, S, D], the prompt keys (H % Hkv == 0).
        scale: score scale.
    """
    batch, heads, window, _ = q_obs.shape
    kv_heads, seq_len = k.shape[1], k.shape[2]
    if heads % kv_heads or window > seq_len:
        raise ValueError(f"slimming: q_obs {tuple(q_obs.shape)} does not fit keys {tuple(k.shape)}")
    group = heads // kv_heads
    positions = torch.arange(seq_len, device=k.device)
    visible = (
        positions[None, :] <= (seq_len - window + torch.arange(window, device=k.device))[:, None]
    )  # [w, S]
    observed = torch.empty(batch, kv_heads, seq_len, dtype=torch.float32, device=k.device)
    for h in range(kv_heads):  # one KV head at a time bounds the fp32 scores to [B, G, w, S]
        scores = (
            q_obs[:, h * group : (h + 1) * group].float() @ k[:, h, None].float().transpose(-1, -2)
        ) * scale
        attention = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        observed[:, h] = attention.mean(2).amax(1)
    return observed


def plan_slimming(observed: Tensor, region: Tensor, config: OmniSparseConfig) -> SlimPlan:
    """Classify heads and pick what each keeps (the rule of the module docstring).

    Args:
        observed: float32 [B, Hkv, S], from `observed_attention`.
        region: bool [B or 1, S], from `long_range_region`.
    """
    batch, kv_heads, seq_len = observed.shape
    region = region.expand(batch, seq_len)
    on_region = observed * region[:, None, :]
    mass_on_region = on_region.sum(-1)
    local_heads = mass_on_region < config.head_mass_eps

    num_blocks = -(-seq_len // SLIM_BLOCK)
    pad = num_blocks * SLIM_BLOCK - seq_len
    if config.tau_decode >= 1.0:
        chosen = torch.ones(batch, kv_heads, num_blocks, dtype=torch.bool, device=observed.device)
    else:
        block_mass = F.pad(on_region, (0, pad)).view(batch, kv_heads, num_blocks, SLIM_BLOCK).sum(-1)
        ranked, order = block_mass.sort(dim=-1, descending=True, stable=True)
        mass_before = ranked.cumsum(-1) - ranked  # mass of the blocks ranked above each block
        taken = mass_before < config.tau_decode * mass_on_region[..., None]
        chosen = torch.zeros_like(taken).scatter_(-1, order, taken)
    in_chosen_block = chosen.repeat_interleave(SLIM_BLOCK, dim=-1)[..., :seq_len]
    keep = ~region[:, None, :] | (in_chosen_block & ~local_heads[..., None])
    return SlimPlan(keep=keep, region=region, mass_on_region=mass_on_region, local_heads=local_heads)


def slim(
    queries: Tensor, k: Tensor, config: OmniSparseConfig, scale: float, token_mask: Tensor | None = None
) -> SlimPlan:
    """The slimming plan of one layer.

    Args:
        queries: [B, H, Sq, D], the queries of the last Sq prompt positions (Sq <= S); the last
            ``obs_window`` of them are the observation.
        k: [B, Hkv, S, D], the prompt keys.
        scale: score scale of the layer's attention.
        token_mask: optional bool [S] or [B, S] marking the visual tokens.
    """
    region = long_range_region(k.shape[2], config, token_mask, device=k.device)
    return plan_slimming(observed_attention(queries[:, :, -config.obs_window :], k, scale), region, config)
