"""`SlimKVCache`: a transformers Cache that slims itself after the prefill (METHOD.md section 4).

Use with an unmodified transformers model (Llama, Qwen2, ... any model whose attention calls
``past_key_values.update`` and then the registered attention function, as transformers 5.x models do)::

    import omnicompile.hf_cache  # registers the attention implementation "omnisparse_decode"
    model.set_attn_implementation("omnisparse_decode")  # or from_pretrained(..., attn_implementation=...)
    model.generate(ids, past_key_values=SlimKVCache(model.config, OmniSparseConfig(...)))

How the observation reaches the cache and how decode reads it: each attention layer calls
``cache.update(k, v, layer_idx)`` and hands the tensors it returns to the attention function. `update`
tags the returned key tensor with a weak reference to its `SlimKVLayer` (attribute
``_omnisparse_slim_layer``); the attention function (`with_slim_cache` of a prefill attention:
SDPA for ``"omnisparse_decode"`` registered here, the op for ``"omnisparse"`` in
`omnicompile.hf_attention`) reads it:
- prefill (the layer's first forward, S tokens): `update` stores the dense K/V and returns them; the
  attention function runs the prefill attention, then, when S >= ``min_seq_len`` and
  ``mode == "sparse"``, passes the layer's queries to `SlimKVLayer.observe`, which keeps per KV head
  what `omnicompile.slimming` decides and repacks the layer into a ragged `SlimKV` (the dense K/V are
  released);
- every later forward of a slimmed layer: `update` appends the new tokens to every head's tail and the
  attention function runs slim decode attention (the split-K Triton kernel where
  `triton_decode.supported`, else the fp32 reference), reading only the kept KV;
- a layer that is not slimmed (short prompt, ``mode == "dense"``) stays a dense cache and runs the
  prefill attention.
- a sliding-window layer (``layer_types`` entry ``"sliding_attention"``, Gemma 3's local layers) is
  transformers' `DynamicSlidingWindowLayer`: it already keeps only the window; it runs the prefill
  attention with the sliding window and is never slimmed.
With ``decode_capacity=C`` every layer's tail is static (C slots preallocated after the prefill, the
length T on the device, appends in place): a decode step has static shapes and addresses and reads nothing
on the host, the cache is `is_compileable`, and transformers' ``generate`` compiles its decode steps on
CUDA (``mode="reduce-overhead"``: replayed from CUDA graphs; docs/DECODE.md). Dynamo traces the tag above
(set and read in one frame), so the compiled step finds its layer the same way.
The attention mask function of ``"omnisparse_decode"`` is transformers' SDPA one. Supported: batch
size >= 1, unpadded or left-padded (each row slimmed alone on its tokens, padding never kept; any
other padding is an error for a slimmed layer), greedy or sampled
decoding, chunks of several new tokens, `crop` of tokens generated after slimming. Not supported
(clear errors): beam search and other batch reordering, layer types other than full and sliding
attention, a batch size change, a model whose KV shapes differ from the config.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import AttentionInterface, PreTrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from .config import OmniSparseConfig
from .kernels.decode.op import slim_decode
from .kernels.decode.slim_kv import SlimKV, host_readable, storage_bytes
from .memo import PerForward
from .slimming import slim

ATTN_IMPLEMENTATION = "omnisparse_decode"
_LAYER_TAG = "_omnisparse_slim_layer"


@dataclass(frozen=True)
class LayerSlimming:
    """What slimming decided for one layer.

    Attributes:
        prompt_len: S, the prefill length.
        kept_prompt_tokens: int32 [B, Hkv], prompt tokens kept per KV head.
        local_heads: bool [B, Hkv], heads classified local.
        mass_on_region: float32 [B, Hkv], observed attention mass on the long-range region R.
    """

    prompt_len: int
    kept_prompt_tokens: Tensor
    local_heads: Tensor
    mass_on_region: Tensor


class SlimKVLayer(CacheLayerMixin):
    """One layer of a `SlimKVCache`: dense until its prefill is observed, then a ragged `SlimKV`.

    ``decode_capacity``: None for a growing tail (a layer whose prefill is not slimmed stays dense);
    else the tail slots of a static tail, and every layer is packed after its prefill (the whole prompt
    where the rule does not slim it), so every decode step has static shapes (`is_compileable`).
    """

    is_sliding = False
    is_croppable = True

    def __init__(
        self,
        layer_idx: int,
        config: OmniSparseConfig,
        num_kv_heads: int,
        head_dim: int,
        token_mask: Tensor | None = None,
        decode_capacity: int | None = None,
    ):
        super().__init__()
        self.layer_idx, self.config, self.token_mask = layer_idx, config, token_mask
        self.kv_shape = (num_kv_heads, head_dim)
        self.decode_capacity = decode_capacity
        self.slim: SlimKV | None = None
        self.slimming: LayerSlimming | None = None
        self.prompt_len = 0
        self.prompt_tokens: Tensor | None = None  # bool [B, S] of a padded prompt, None without padding
        self.awaits_observation = False

    @property
    def is_compileable(self) -> bool:
        """A static tail: transformers' `generate` compiles the decode step (its CUDA graphs on CUDA)."""
        return self.decode_capacity is not None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, dim = key_states.shape
        self.keys = key_states.new_empty(batch, heads, 0, dim)
        self.values = value_states.new_empty(batch, heads, 0, dim)
        self.is_initialized = True

    def _check_states(self, key_states: Tensor, value_states: Tensor) -> None:
        if (
            key_states.dim() != 4
            or key_states.shape != value_states.shape
            or (key_states.shape[1], key_states.shape[3]) != self.kv_shape
        ):
            raise ValueError(
                f"SlimKVCache layer {self.layer_idx}: key/value states {tuple(key_states.shape)} / "
                f"{tuple(value_states.shape)} do not have the (KV heads, head dim) {self.kv_shape} "
                "of the model config the cache was built for: the cache is used with a different model"
            )
        cached = (
            self.slim.batch_size
            if self.slim is not None
            else (self.keys.shape[0] if self.is_initialized else None)
        )
        if cached is not None and key_states.shape[0] != cached:
            raise ValueError(
                f"SlimKVCache layer {self.layer_idx}: batch size changed from {cached} "
                f"to {key_states.shape[0]} (beam search and batch expansion are not supported)"
            )

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Store new tokens and return what the attention function reads (the key tensor is tagged).

        Args:
            key_states, value_states: [B, Hkv, n, D], the new tokens' keys/values (after RoPE).

        Returns:
            Dense [B, Hkv, S, D] keys/values before slimming, the tail slots [B, Hkv, C, D] after.
        """
        self._check_states(key_states, value_states)
        if self.awaits_observation:
            raise RuntimeError(
                f"SlimKVCache layer {self.layer_idx}: the prefill was never observed, "
                "so the cache was not slimmed; "
                f"run the model with attn_implementation={ATTN_IMPLEMENTATION!r}"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.slim is not None:
            self.slim = self.slim.append(key_states, value_states)
            keys, values = self.slim.k_tail, self.slim.v_tail
        else:
            prefill = self.keys.shape[2] == 0
            self.keys = torch.cat([self.keys, key_states], dim=2)
            self.values = torch.cat([self.values, value_states], dim=2)
            keys, values = self.keys, self.values
            self.awaits_observation = prefill and (
                self.decode_capacity is not None or self._slims(key_states.shape[2])
            )
        setattr(keys, _LAYER_TAG, weakref.ref(self))  # weak: no layer <-> tensor cycle delays freeing
        return keys, values

    def _slims(self, prompt_len: int) -> bool:
        """Whether the slimming rule runs on a prefill of ``prompt_len`` tokens."""
        return self.config.mode == "sparse" and prompt_len >= self.config.min_seq_len

    def observe(self, queries: Tensor, scale: float, tokens: Tensor | None = None) -> None:
        """Slim the layer from its prefill queries [B, H, S, D] (only the last ``obs_window`` are used).

        ``tokens``: bool [B, S], the prompt tokens of a left-padded batch (True = token; each row's
        tokens end at S), or None without padding. A padded batch is slimmed row by row on the row's
        tokens alone (as if it ran alone: a row shorter than ``min_seq_len`` keeps everything); padding
        is never kept, so decode never reads it. With a static tail, a prefill the rule does not slim
        is packed whole (its tokens; `slimming` stays None) and the packed tensors are marked as static
        addresses for CUDA graphs.
        """
        batch, kv_heads, prompt_len, _ = self.keys.shape
        keep, self.slimming = None, None
        if not self._slims(prompt_len):
            keep = torch.ones(batch, kv_heads, prompt_len, dtype=torch.bool, device=self.keys.device)
            if tokens is not None:
                keep &= tokens[:, None, :]
        elif tokens is None:
            plan = slim(queries, self.keys, self.config, scale, self.token_mask)
            keep, local_heads, mass_on_region = plan.keep, plan.local_heads, plan.mass_on_region
        else:
            keep, local_heads, mass_on_region = self._slim_rows(queries, scale, tokens)
        self.slim = SlimKV.pack(self.keys, self.values, keep, self.decode_capacity)
        if self._slims(prompt_len):
            self.slimming = LayerSlimming(
                prompt_len=prompt_len,
                kept_prompt_tokens=self.slim.lengths,
                local_heads=local_heads,
                mass_on_region=mass_on_region,
            )
        if self.slim.static and host_readable(keep):
            for tensor in self.slim.tensors():  # unguarded: a new cache re-records, never recompiles
                torch._dynamo.mark_static_address(tensor, guard=False)
        self.prompt_len, self.prompt_tokens = prompt_len, tokens
        self.keys = self.values = None
        self.awaits_observation = False

    def _slim_rows(self, queries: Tensor, scale: float, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(keep [B, Hkv, S], local_heads [B, Hkv], mass_on_region [B, Hkv]) of each row slimmed alone."""
        batch, kv_heads, seq_len, _ = self.keys.shape
        keep = torch.zeros(batch, kv_heads, seq_len, dtype=torch.bool, device=self.keys.device)
        local_heads = torch.zeros(batch, kv_heads, dtype=torch.bool, device=keep.device)
        mass_on_region = torch.zeros(batch, kv_heads, dtype=torch.float32, device=keep.device)
        token_mask = self.token_mask
        for row, count in enumerate(tokens.sum(-1).tolist()):
            start = seq_len - count
            if count < self.config.min_seq_len:  # alone, the row would not be slimmed
                keep[row, :, start:] = True
                continue
            row_mask = None
            if token_mask is not None:
                row_mask = (token_mask if token_mask.dim() == 1 else token_mask[row])[start:]
            plan = slim(
                queries[row : row + 1, :, start:],
                self.keys[row : row + 1, :, start:],
                self.config,
                scale,
                row_mask,
            )
            keep[row, :, start:] = plan.keep[0]
            local_heads[row], mass_on_region[row] = plan.local_heads[0], plan.mass_on_region[0]
        return keep, local_heads, mass_on_region

    def get_seq_length(self) -> int | Tensor:
        """Tokens seen: an int, or for a static tail a 0-d device tensor (as transformers' `StaticLayer`)."""
        if self.slim is not None:
            tail = self.slim.tail_len
            return self.prompt_len + (self.slim.tail_length if tail is None else tail)
        return self.keys.shape[2] if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int | Tensor) -> tuple[int, int]:
        """(kv_length, 0); a static tail's is fixed, S + C (its decode steps do not read the mask)."""
        if isinstance(
            query_length, Tensor
        ):  # before transformers 5.3: cache_position, one entry per new token
            query_length = query_length.shape[0]
        if self.slim is not None and self.slim.static:
            return self.prompt_len + self.slim.capacity, 0
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self.prompt_len + self.slim.capacity if self.slim is not None and self.slim.static else -1

    get_max_cache_shape = get_max_length  # its name before transformers 5.3

    def kept_lengths(self) -> Tensor:
        """int64 [B, Hkv]: tokens stored per KV head (kept prompt tokens plus later tokens)."""
        if self.slim is not None:
            return self.slim.lengths.long() + self.slim.tail_length
        if not self.is_initialized:
            raise RuntimeError(f"SlimKVCache layer {self.layer_idx} holds nothing yet")
        return torch.full(self.keys.shape[:2], self.keys.shape[2], dtype=torch.long, device=self.keys.device)

    def stored_bytes(self) -> int:
        """Bytes of the tensors this layer holds (measured)."""
        if self.slim is not None:
            return self.slim.stored_bytes()
        return storage_bytes(self.keys, self.values) if self.is_initialized else 0

    def reset(self) -> None:
        self.keys = self.values = self.slim = self.slimming = self.prompt_tokens = None
        self.is_initialized = self.awaits_observation = False
        self.prompt_len = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (a negative count, as transformers 5.x calls it)."""
        if tokens_to_remove > 0:
            raise ValueError(f"SlimKVCache.crop: pass a negative token count, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        if self.slim is not None:
            added = int(self.slim.tail_length)  # a host read: crop runs between steps
            if -tokens_to_remove > added:
                raise ValueError(
                    f"SlimKVCache.crop: cannot remove {-tokens_to_remove} tokens: "
                    f"only the {added} tokens added after slimming can be removed"
                )
            self.slim = self.slim.drop_tail(-tokens_to_remove)
        else:
            self.keys, self.values = self.keys[:, :, :tokens_to_remove], self.values[:, :, :tokens_to_remove]

    def reorder_cache(self, beam_idx: Tensor) -> None:
        raise NotImplementedError(
            "SlimKVCache does not support beam search (per-head ragged storage); use num_beams=1"
        )

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("SlimKVCache does not support batch expansion of a filled cache")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise NotImplementedError("SlimKVCache does not support batch selection of a filled cache")


class SlimKVCache(Cache):
    """A cache that keeps, per layer and KV head, only what decode slimming decides (METHOD.md section 4).

    Args:
        model_config: the model's transformers config (layers, KV heads, head dim are checked against it).
        config: the slimming settings (obs_window, recent_window, head_mass_eps, tau_decode, visual_spans,
            n_sink, block_size, min_seq_len, mode).
        token_mask: optional bool [S] or [B, S] marking the prompt's visual tokens (the long-range
            region R); alternative to ``config.visual_spans``.
        decode_capacity: None (default): each layer's tail grows by concatenation. An int C >= 1:
            after its prefill every layer holds a static tail of C slots (the tokens of up to C decode
            forwards' worth: ``max_new_tokens - 1`` for `generate`) written in place at a device-side
            position, so a decode step has static shapes, reads nothing on the host and can be
            replayed from a CUDA graph: the cache is then `is_compileable` and transformers' `generate`
            compiles its decode steps (``mode="reduce-overhead"``, Inductor's CUDA graphs) on CUDA.
            Full-attention layers only; more than C tokens after the prefill is an error.
    """

    def __init__(
        self,
        model_config: PreTrainedConfig,
        config: OmniSparseConfig | None = None,
        token_mask: Tensor | None = None,
        decode_capacity: int | None = None,
    ):
        config = OmniSparseConfig() if config is None else config
        if not isinstance(config, OmniSparseConfig):
            raise TypeError(f"SlimKVCache: config must be an OmniSparseConfig, got {type(config).__name__}")
        if decode_capacity is not None and (not isinstance(decode_capacity, int) or decode_capacity < 1):
            raise ValueError(
                f"SlimKVCache: decode_capacity must be None or an int >= 1, got {decode_capacity!r}"
            )
        text_config = model_config.get_text_config(decoder=True)
        layer_types = (
            getattr(text_config, "layer_types", None) or ["full_attention"] * text_config.num_hidden_layers
        )
        unsupported = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unsupported:
            raise ValueError(
                "SlimKVCache: full and sliding-window attention layers are supported, "
                f"the model has {unsupported}"
            )
        if decode_capacity is not None and "sliding_attention" in layer_types:
            raise ValueError(
                "SlimKVCache: decode_capacity (a static tail) supports full-attention layers only, "
                "the model has sliding-window layers; use decode_capacity=None"
            )
        head_dim = (
            getattr(text_config, "head_dim", None)
            or text_config.hidden_size // text_config.num_attention_heads
        )
        kv_heads = text_config.num_key_value_heads or text_config.num_attention_heads
        super().__init__(
            layers=[
                DynamicSlidingWindowLayer(sliding_window=text_config.sliding_window)
                if layer_types[i] == "sliding_attention"
                else SlimKVLayer(i, config, kv_heads, head_dim, token_mask, decode_capacity)
                for i in range(text_config.num_hidden_layers)
            ]
        )

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[Tensor, Tensor]:
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(
                f"SlimKVCache: layer {layer_idx} does not exist in the {len(self.layers)}-layer "
                "model config the cache was built for: the cache is used with a different model"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def stored_bytes(self) -> int:
        """Bytes of every tensor the cache holds, measured from the tensors (all layers)."""
        return sum(
            layer.stored_bytes()
            if isinstance(layer, SlimKVLayer)
            else storage_bytes(layer.keys, layer.values)
            if layer.is_initialized
            else 0
            for layer in self.layers
        )

    def kept_lengths(self) -> list[Tensor]:
        """Per layer, int64 [B, Hkv]: tokens stored per KV head."""
        return [
            layer.kept_lengths()
            if isinstance(layer, SlimKVLayer)
            else torch.full(
                layer.keys.shape[:2], layer.keys.shape[2], dtype=torch.long, device=layer.keys.device
            )
            for layer in self.layers
        ]

    def slimming(self) -> list[LayerSlimming | None]:
        """Per layer, what slimming decided (None where the layer was not slimmed, sliding layers too)."""
        return [getattr(layer, "slimming", None) for layer in self.layers]


@PerForward
def _visible_keys(attention_mask: Tensor | None) -> Tensor | None:
    """bool [B, S]: the keys the last query sees (True = seen), None where the mask hides none.

    ``attention_mask``: None, a 4-D mask (bool or additive), or a 2-D bool [B, S] padding mask (True =
    token), as the ``"omnisparse"`` mask function returns for padded batches.
    """
    if attention_mask is None:
        return None
    last_row = attention_mask if attention_mask.dim() == 2 else attention_mask[:, :, -1, :]  # [B, (h,) S]
    visible = last_row if last_row.dtype == torch.bool else last_row == 0
    visible = visible if visible.dim() == 2 else visible.all(1)  # hidden from any head: hidden
    return None if bool(visible.all()) else visible


@PerForward
def _prompt_tokens(attention_mask: Tensor | None, prompt_len: int) -> Tensor | None:
    """bool [B, S] prompt tokens of a left-padded prefill (None without padding); ``ValueError`` for any
    other padding (right padding, holes), which decode could not honour."""
    visible = _visible_keys(attention_mask)
    if visible is None:
        return None
    visible = visible[:, -prompt_len:]
    count = visible.sum(-1, keepdim=True)
    if not bool((torch.arange(prompt_len, device=visible.device) >= prompt_len - count).eq(visible).all()):
        raise ValueError(
            "SlimKVCache: only left padding is supported (each row's tokens must end the prompt)"
        )
    return visible


def _check_decode_mask(attention_mask: Tensor | None, layer: SlimKVLayer) -> None:
    """Raise unless the mask of a decode step hides exactly the prompt padding that slimming dropped."""
    if _hides_other_keys(attention_mask, layer.prompt_tokens, layer.slim.tail_len):
        raise ValueError(
            "SlimKVCache: the attention mask hides keys other than the prompt's left padding "
            "(the slim cache keeps no masked keys)"
        )


@PerForward
def _hides_other_keys(attention_mask: Tensor | None, prompt: Tensor | None, tail_len: int) -> bool:
    """Whether the mask hides keys other than ``prompt``'s padding (bool [B, S], None: no padding) from a
    cache holding the prompt and ``tail_len`` later tokens (every layer of a forward shares the answer:
    one mask, one `_prompt_tokens`)."""
    visible = _visible_keys(attention_mask)
    if prompt is None:
        return visible is not None
    expected = torch.cat([prompt, prompt.new_ones(prompt.shape[0], tail_len)], 1)
    return visible is None or visible.shape != expected.shape or not torch.equal(visible, expected)


AttentionFunction = Callable[..., tuple[Tensor, Tensor | None]]


def _sdpa_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' SDPA attention (a sliding window is in the SDPA mask already)."""
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)[0], None


def slim_layer(module: torch.nn.Module, key: Tensor) -> SlimKVLayer | None:
    """The `SlimKVLayer` that returned ``key`` from its `update` (None for keys of any other cache)."""
    tag = getattr(key, _LAYER_TAG, None)
    layer: SlimKVLayer | None = tag() if tag is not None else None
    if layer is not None and layer.layer_idx != getattr(module, "layer_idx", layer.layer_idx):
        raise RuntimeError(
            f"{ATTN_IMPLEMENTATION}: module {module.layer_idx} got the cache of layer {layer.layer_idx}"
        )
    return layer


def with_slim_cache(attend: AttentionFunction) -> AttentionFunction:
    """An attention function (transformers' AttentionInterface signature) that decodes a slimmed layer
    of a `SlimKVCache` with `slim_decode`, runs ``attend`` everywhere else (prefill, layers not slimmed,
    sliding-window layers, other caches) and hands a `SlimKVLayer`'s prefill queries to its `observe`.

    ``attend`` has the same signature and returns attn_output [B, n, H, D] and no weights.
    """

    def forward(
        module: torch.nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        sliding_window: int | None = None,
        **kwargs,
    ) -> tuple[Tensor, None]:
        """query: [B, H, n, D]; key, value: as `SlimKVLayer.update` returned them (or any dense
        [B, Hkv, S, D]). Returns attn_output [B, n, H, D] and no attention weights."""
        # A DynamicSlidingWindowLayer's window: never slimmed.
        layer = None if sliding_window is not None else slim_layer(module, key)
        if layer is not None and kwargs.get("softcap") is not None:
            raise ValueError("SlimKVCache: logit soft-capping is not supported (slim decode does not cap)")
        if layer is None or layer.slim is None:
            out, _ = attend(
                module,
                query,
                key,
                value,
                attention_mask,
                dropout=dropout,
                scaling=scaling,
                sliding_window=sliding_window,
                **kwargs,
            )
            if layer is not None and layer.awaits_observation:
                tokens = _prompt_tokens(attention_mask, key.shape[2])
                layer.observe(query, query.shape[-1] ** -0.5 if scaling is None else scaling, tokens)
            return out, None
        if dropout:
            raise ValueError(f"{ATTN_IMPLEMENTATION}: dropout is not supported on a slimmed cache")
        if not layer.slim.static:  # a static tail's step reads nothing on the host: its mask is not read
            _check_decode_mask(attention_mask, layer)
        out, _ = slim_decode(query, layer.slim, scaling)
        return out.transpose(1, 2).contiguous(), None

    return forward


slim_attention_forward = with_slim_cache(_sdpa_forward)
"""The ``"omnisparse_decode"`` attention function: SDPA prefill, slim decode."""


def register_attention() -> None:
    """Register `slim_attention_forward` (and the SDPA mask).

    As ``attn_implementation="omnisparse_decode"``.
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, slim_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)


register_attention()
