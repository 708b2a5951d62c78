"""``attn_implementation="omnisparse"``: the op as a transformers attention implementation (issue 20).

Importing this module registers, in transformers' `AttentionInterface` and mask interface, the name
``"omnisparse"``, so an unmodified model runs its attention as ``torch.ops.omnisparse.attention``
without ``torch.compile`` (and also under it, with any backend)::

    import omnicompile.hf_attention as hf_attention

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="omnisparse")
    hf_attention.set_config(model, OmniSparseConfig(tau=0.95))  # else OmniSparseConfig() defaults
    model.generate(ids, past_key_values=SlimKVCache(model.config, config))  # slim decode (optional)

The op's config is read from the model config's attribute ``omnisparse_config`` (the JSON of an
`OmniSparseConfig`, written by `set_config`; a string, so ``save_pretrained`` keeps it); a config
without it runs `OmniSparseConfig()`. A `SlimKVCache` keeps its own config (pass it the same one).

Prefill and decode (`attention_forward`, wrapped by `hf_cache.with_slim_cache`):
- the prefill of a layer and every forward of a layer that is not slimmed call the op; a sliding-window
  layer (Gemma 3's local layers) passes ``window=sliding_window``;
- a decode step of a layer slimmed by a `SlimKVCache` reads only its kept KV (`hf_cache.slim_decode`);
  with any other cache a decode step is the op's dense path (SDPA: query shorter than a block);
- logit soft-capping (Gemma 2's ``softcap``) goes to the op as its ``softcap`` (a `SlimKVCache` rejects it).

Masks (`omnisparse_mask`, the mask function of the implementation), for a plain causal or sliding-window
mask (no extra mask functions, no packed sequences) of a prefill from an empty cache (q_len == kv_len)
or a one-token decode step:
- no padding: ``None``, and the op runs ``is_causal=True`` (prefill) with no mask: no [S, S] mask is
  built;
- left or right padding (each row's tokens contiguous): the bool [B, kv_len] padding mask (True =
  token); the attention function then runs the op once per row on that row's tokens only (selection
  and kernels per sequence, no work on padding), so each row equals the row run alone; output rows at
  padding positions are zeros (what SDPA gives for such fully masked rows on the CPU);
- anything else (holes in a row's padding, chunked prefill against a cache, extra mask functions,
  bidirectional masks), and every mask while Dynamo traces (the padding cannot be read there): the
  bool 4-D mask of transformers' SDPA mask function, which the op takes as a mask (the omnisparse
  backend's ``mask_from_positions`` then proves it causal or checks it at run time).
Not supported (errors): a position bias, attention sinks, dropout > 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)

from . import ops  # noqa: F401  (registers torch.ops.omnisparse.attention)
from .config import OmniSparseConfig
from .hf_cache import with_slim_cache

ATTN_IMPLEMENTATION = "omnisparse"
CONFIG_ATTRIBUTE = "omnisparse_config"
_DEFAULT_CONFIG = OmniSparseConfig().to_json()
_UNSUPPORTED = {
    "position_bias": "a position bias",
    "s_aux": "attention sinks",
}


def set_config(model: torch.nn.Module, config: OmniSparseConfig) -> None:
    """Make ``model`` (attn_implementation ``"omnisparse"``) run the op with ``config``: stored as JSON in
    ``omnisparse_config`` of the model config and of its decoder text config (multimodal models)."""
    if not isinstance(config, OmniSparseConfig):
        raise TypeError(f"set_config: config must be an OmniSparseConfig, got {type(config).__name__}")
    for model_config in (model.config, model.config.get_text_config(decoder=True)):
        setattr(model_config, CONFIG_ATTRIBUTE, config.to_json())


def _is_sliding(mask_function: Callable[..., Tensor], window: int) -> bool:
    """Whether ``mask_function`` (causal and window-banded, or chunked: the two that transformers builds
    with ``local_size``) is the sliding window: it keeps (q, q - 1) for every q of a whole chunk span."""
    q = torch.arange(window, 2 * window)
    return bool(mask_function(torch.tensor(0), torch.tensor(0), q, q - 1).all())


def _contiguous_rows(padding: Tensor) -> bool:
    """Whether every row of the bool [B, S] ``padding`` mask holds its tokens in one contiguous span."""
    count = padding.sum(-1, keepdim=True)
    start = padding.int().argmax(-1, keepdim=True)
    position = torch.arange(padding.shape[-1], device=padding.device)
    return bool(((position >= start) & (position < start + count)).eq(padding).all())


def omnisparse_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable[..., Tensor] = causal_mask_function,
    attention_mask: Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    **kwargs,
) -> Tensor | None:
    """The mask function of ``"omnisparse"`` (transformers' mask interface signature; module docstring).

    Returns None (plain causal, no padding), a bool [B, kv_length] padding mask (plain causal, each row's
    tokens contiguous) or transformers' bool [B, 1, q_length, kv_length] SDPA mask (everything else).
    """
    sdpa_args = dict(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        local_size=local_size,
        allow_is_causal_skip=allow_is_causal_skip,
        **kwargs,
    )
    if torch.compiler.is_compiling():
        return sdpa_mask(**sdpa_args)
    prefill = isinstance(q_offset, int) and q_offset == 0 and q_length == kv_length
    if local_size is None:
        plain = mask_function is causal_mask_function
    else:  # a decode step must see the whole window: the cache holds at most the window
        plain = _is_sliding(mask_function, local_size) and (prefill or kv_length <= local_size)
    if not (allow_is_causal_skip and plain and (prefill or q_length == 1)):
        return sdpa_mask(**sdpa_args)
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)  # [B, >= kv_offset + kv_length]
    if padding is not None:
        padding = padding[:, kv_offset : kv_offset + kv_length]
    if padding is None or bool(padding.all()):
        return None
    return padding if _contiguous_rows(padding) else sdpa_mask(**sdpa_args)


def _op(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scaling: float | None,
    window: int | None,
    softcap: float | None,
) -> Tensor:
    """The op's output [B, H, n, Dv] (query [B, H, n, D], key, value [B, Hkv, S, D]); ``softcap``: the
    logit soft-cap, or None."""
    config = getattr(module.config, CONFIG_ATTRIBUTE, None) or _DEFAULT_CONFIG
    site = f"hf.layer{getattr(module, 'layer_idx', '')}"
    out, _ = torch.ops.omnisparse.attention(
        query,
        key,
        value,
        attn_mask,
        0.0,
        is_causal,
        scaling,
        query.shape[1] != key.shape[1],
        config,
        site,
        window if is_causal and attn_mask is None else None,
        None,
        softcap,
        need_lse=False,
    )
    return out


def _per_row(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    padding: Tensor,
    causal: bool,
    scaling: float | None,
    window: int | None,
    softcap: float | None,
) -> Tensor:
    """The op run once per row on that row's tokens only; [B, H, n, Dv], zeros at padding positions.

    ``padding``: bool [B, S], each row's tokens contiguous. A prefill (n == S) takes the row's tokens as
    queries too; a decode step (n == 1) attends from its one query to the row's tokens.
    """
    out = query.new_zeros(*query.shape[:3], value.shape[-1])
    starts, counts = padding.int().argmax(-1).tolist(), padding.sum(-1).tolist()
    for row, (start, count) in enumerate(zip(starts, counts)):
        if count == 0:
            continue
        tokens = slice(start, start + count)
        queries = tokens if query.shape[2] == key.shape[2] else slice(None)
        out[row, :, queries] = _op(
            module,
            query[row : row + 1, :, queries],
            key[row : row + 1, :, tokens],
            value[row : row + 1, :, tokens],
            None,
            causal and query.shape[2] > 1,
            scaling,
            window,
            softcap,
        )[0]
    return out


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """Attention through the op (transformers' AttentionInterface signature).

    Args:
        query: [B, H, n, D]; key, value: [B, Hkv, S, D]; attention_mask: what `omnisparse_mask` returned
            (None, a bool [B, S] padding mask, a 4-D mask) or a 4-D mask the caller made.
        sliding_window: the layer's window (None for full attention).
        kwargs: ``softcap`` (Gemma 2's logit soft-cap) is passed to the op; the features of
            ``_UNSUPPORTED`` raise ``ValueError``; the rest is ignored.

    Returns:
        attn_output [B, n, H, Dv] and no attention weights.
    """
    for name, feature in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"{ATTN_IMPLEMENTATION} attention does not support {feature}; use 'eager'")
    if dropout:
        raise ValueError(f"{ATTN_IMPLEMENTATION} attention does not support dropout ({dropout}); use 'sdpa'")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    softcap = kwargs.get("softcap")
    if attention_mask is not None and attention_mask.dim() == 2:
        out = _per_row(module, query, key, value, attention_mask, causal, scaling, sliding_window, softcap)
    else:
        causal = causal and attention_mask is None and query.shape[2] > 1
        out = _op(module, query, key, value, attention_mask, causal, scaling, sliding_window, softcap)
    return out.transpose(1, 2).contiguous(), None


omnisparse_attention_forward = with_slim_cache(attention_forward)
"""The ``"omnisparse"`` attention function: the op, and slim decode for a `SlimKVCache`'s slimmed layers."""


def register_attention() -> None:
    """Register `omnisparse_attention_forward` and `omnisparse_mask` as ``"omnisparse"``."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, omnisparse_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, omnisparse_mask)


register_attention()
