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
mask (no extra mask functions) whose queries are the newest keys (a prefill, a chunk of a chunked
prefill or a prefill against an existing cache, a decode step; a sliding layer's chunk or step only
while the cache is within the window):
- no padding: ``None``, and the attention runs bottom-right causal without a mask (`_attend_last`:
  the op's ``is_causal=True`` for a prefill, `varlen.prefix_causal_attention` for a chunk after a
  cached prefix, the unmasked op for one query): no [S, S] mask is built;
- left or right padding (each row's tokens contiguous): the bool [B, kv_len] padding mask (True =
  token); the attention function then runs once per row on that row's tokens only (selection
  and kernels per sequence, no work on padding), so each row equals the row run alone; output rows at
  padding positions are zeros (what SDPA gives for such fully masked rows on the CPU);
- anything else (holes in a row's padding, a static cache without a padding mask, extra mask
  functions, bidirectional masks), and every mask while Dynamo traces (the padding cannot be read
  there): the bool 4-D mask of transformers' SDPA mask function, which the op takes as a mask (the
  omnisparse backend's ``mask_from_positions`` then proves it causal or checks it at run time).
Packed sequences (batch size 1; flash-attention's ``cu_seq_lens_q`` / ``cu_seq_lens_k`` kwargs, or
position ids that restart, as transformers detects packing) run one by one (`varlen.varlen_attention`);
the 4-D mask transformers builds for them is checked to be causal within each sequence.
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
from .memo import PerForward
from .varlen import prefix_causal_attention, varlen_attention, varlen_mask

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
    q_offset = int(q_offset)  # a cache may keep it as a tensor (one read, outside tracing)
    prefill = q_offset == 0 and q_length == kv_length
    if local_size is None:
        plain = mask_function is causal_mask_function
    else:  # a chunk or decode step must see the whole window: the cache holds at most the window
        plain = _is_sliding(mask_function, local_size) and (prefill or kv_length <= local_size)
    if not (allow_is_causal_skip and plain):
        return sdpa_mask(**sdpa_args)
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)  # [B, >= kv_offset + kv_length]
    if padding is not None:
        padding = padding[:, kv_offset : kv_offset + kv_length]
    if _tokens_end(padding, kv_length) != q_offset + q_length - kv_offset:  # e.g. a static cache's free slots
        return sdpa_mask(**sdpa_args)
    if padding is None or bool(padding.all()):
        return None
    return padding if _contiguous_rows(padding) else sdpa_mask(**sdpa_args)


def _tokens_end(padding: Tensor | None, kv_length: int) -> int:
    """One past the last token of any row of the bool [B, kv_length] ``padding`` (None: no padding)."""
    if padding is None:
        return kv_length
    last = kv_length - padding.flip(-1).int().argmax(-1)  # per row: one past its last True
    return int(torch.where(padding.any(-1), last, 0).max())


def _config(module: torch.nn.Module) -> str:
    return getattr(module.config, CONFIG_ATTRIBUTE, None) or _DEFAULT_CONFIG


def _site(module: torch.nn.Module) -> str:
    return f"hf.layer{getattr(module, 'layer_idx', '')}"


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
    out, _ = torch.ops.omnisparse.attention(
        query,
        key,
        value,
        attn_mask,
        0.0,
        is_causal,
        scaling,
        query.shape[1] != key.shape[1],
        _config(module),
        _site(module),
        window if is_causal and attn_mask is None else None,
        None,
        softcap,
        need_lse=False,
    )
    return out


def _attend_last(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    causal: bool,
    scaling: float | None,
    window: int | None,
    softcap: float | None,
) -> Tensor:
    """[B, H, n, Dv]: queries [B, H, n, D] at the last n of the S positions of key, value [B, Hkv, S, D].

    Causal: bottom-right (query i sees keys up to S - n + i): the op's causal path (n == S, with the
    layer's ``window``), its unmasked path (n == 1) or `varlen.prefix_causal_attention` (a chunk after
    a cached prefix; no window: the mask function sends a sliding layer here only when S <= window).
    """
    n, total = query.shape[2], key.shape[2]
    if not causal or n == total or n == 1:
        return _op(module, query, key, value, None, causal and n > 1, scaling, window, softcap)
    if window is not None and total > window:
        raise ValueError(
            f"{ATTN_IMPLEMENTATION}: a {n}-query chunk over {total} keys with a {window}-token window"
        )
    return prefix_causal_attention(query, key, value, _config(module), scaling, softcap, _site(module))


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
    """The attention run once per row on that row's tokens only; [B, H, n, Dv], zeros at padding positions.

    ``padding``: bool [B, S], each row's tokens contiguous. The n queries are the n positions before the
    end of the last row's tokens (prefill: n == S; chunked prefill or decode: n < S; a static cache's
    free slots after them); a row's queries at its token positions attend (`_attend_last`) to the
    row's tokens up to its last one.
    """
    out = query.new_zeros(*query.shape[:3], value.shape[-1])
    first = _tokens_end(padding, key.shape[2]) - query.shape[2]  # the position of query 0
    starts, counts = padding.int().argmax(-1).tolist(), padding.sum(-1).tolist()
    for row, (start, count) in enumerate(zip(starts, counts)):
        begin = max(start, first)
        if start + count <= begin:
            continue
        queries, tokens = slice(begin - first, start + count - first), slice(start, start + count)
        out[row, :, queries] = _attend_last(
            module,
            query[row : row + 1, :, queries],
            key[row : row + 1, :, tokens],
            value[row : row + 1, :, tokens],
            causal,
            scaling,
            window,
            softcap,
        )[0]
    return out


@PerForward
def _restarts(position_ids: Tensor) -> Tensor | None:
    """int64 [N + 1] sequence bounds of position ids [1, T] that restart (a new sequence where the position
    does not rise by one, as transformers finds packed sequences), or None where they never restart."""
    starts = (position_ids[0].diff() != 1).nonzero().flatten() + 1
    if starts.numel() == 0:
        return None
    total = torch.tensor([0, position_ids.shape[1]], device=starts.device)
    return torch.cat([total[:1], starts, total[1:]])


def _packed_bounds(position_ids: Tensor | None, kwargs: dict) -> tuple[Tensor, Tensor] | None:
    """(cu_seqlens_q, cu_seqlens_k) of a packed batch: flash-attention's kwargs ``cu_seq_lens_q`` /
    ``cu_seq_lens_k`` when given, else from restarting ``position_ids`` [1, T] (`_restarts`), else None."""
    if kwargs.get("cu_seq_lens_q") is not None:
        return kwargs["cu_seq_lens_q"], kwargs.get("cu_seq_lens_k", kwargs["cu_seq_lens_q"])
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    bounds = _restarts(position_ids) if position_ids.shape[1] > 1 else None
    return None if bounds is None else (bounds, bounds)


@PerForward
def _packed_mask_matches(attention_mask: Tensor, cu_q: Tensor, cu_k: Tensor, causal: bool) -> bool:
    """Whether a 4-D mask (bool, or additive: 0 = keep) is `varlen_mask` of the sequences."""
    keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    return keep.dim() == 4 and bool((keep == varlen_mask(cu_q, cu_k, causal, attention_mask.device)).all())


def _packed(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    bounds: tuple[Tensor, Tensor],
    causal: bool,
    scaling: float | None,
    softcap: float | None,
) -> Tensor:
    """[1, H, Tq, Dv]: the packed sequences of query [1, H, Tq, D], key, value [1, Hkv, Tk, D] run one by
    one (`varlen.varlen_attention`). A 4-D mask (transformers builds one from packed position ids) must be
    what the sequences imply (causal within each sequence, bottom-right), else ``ValueError``."""
    if query.shape[0] != 1:
        raise ValueError(f"{ATTN_IMPLEMENTATION}: packed sequences need batch size 1, got {query.shape[0]}")
    cu_q, cu_k = bounds
    if attention_mask is not None and not _packed_mask_matches(attention_mask, cu_q, cu_k, causal):
        raise ValueError(
            f"{ATTN_IMPLEMENTATION}: packed sequences with a mask other than "
            f"{'causal ' if causal else ''}attention within each sequence are not supported"
        )
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    out = varlen_attention(q, k, v, cu_q, cu_k, _config(module), causal, scaling, softcap, _site(module))
    return out.transpose(0, 1).unsqueeze(0)


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
    position_ids: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """Attention through the op (transformers' AttentionInterface signature).

    Args:
        query: [B, H, n, D], the last n positions of key, value: [B, Hkv, S, D]; attention_mask: what
            `omnisparse_mask` returned (None, a bool [B, S] padding mask, a 4-D mask) or a 4-D mask the
            caller made.
        sliding_window: the layer's window (None for full attention).
        position_ids: [B, n]; packed sequences (B == 1, positions restarting) run one by one.
        kwargs: ``softcap`` (Gemma 2's logit soft-cap) is passed to the op; flash-attention's
            ``cu_seq_lens_q`` / ``cu_seq_lens_k`` give packed sequences; the features of ``_UNSUPPORTED``
            raise ``ValueError``; the rest is ignored.

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
    bounds = None if torch.compiler.is_compiling() else _packed_bounds(position_ids, kwargs)
    if bounds is not None:
        out = _packed(module, query, key, value, attention_mask, bounds, causal, scaling, softcap)
    elif attention_mask is not None and attention_mask.dim() == 2:
        out = _per_row(module, query, key, value, attention_mask, causal, scaling, sliding_window, softcap)
    elif attention_mask is None:
        out = _attend_last(module, query, key, value, causal, scaling, sliding_window, softcap)
    else:
        out = _op(module, query, key, value, attention_mask, False, scaling, sliding_window, softcap)
    return out.transpose(1, 2).contiguous(), None


omnisparse_attention_forward = with_slim_cache(attention_forward)
"""The ``"omnisparse"`` attention function: the op, and slim decode for a `SlimKVCache`'s slimmed layers."""


def register_attention() -> None:
    """Register `omnisparse_attention_forward` and `omnisparse_mask` as ``"omnisparse"``."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, omnisparse_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, omnisparse_mask)


register_attention()
