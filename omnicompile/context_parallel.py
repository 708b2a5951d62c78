"""Sparse attention under context parallelism: PyTorch's ring engine with the OmniSparse op at every step
(issue 21; docs/CONTEXT_PARALLEL.md).

Each rank of a 1-D `DeviceMesh` holds a shard of the sequence: with ``load_balance=True`` (causal
attention; PyTorch's default) the head-tail sharding of PyTorch's ``_HeadTailLoadBalancer``: the
sequence cut into 2W chunks, rank r holding chunks r and 2W - 1 - r (`shard`, `unshard`). The ring is
PyTorch's own (``_templated_ring_attention`` and ``_templated_ring_attention_backward`` of
``torch.distributed.tensor.experimental``, the functions its ``context_parallel`` runs SDPA through):
it moves the KV shards (all-gather by default, ring all-to-all after
``set_rotate_method("alltoall")``), decides what each step sees and merges the steps' results by their
log-sum-exp. Here each step's attention is ``torch.ops.omnisparse.attention`` (``need_lse=True``) on the
visiting KV shard, so the block selection of a step is made by the op against exactly the keys it
visits. The steps, with load balancing (rank r, step i, source rank s = (r - i) mod W):

- i = 0: the rank's own shard, ``is_causal=True`` (top-left causal on the two concatenated chunks is
  exactly the global causal mask restricted to them);
- s < r: all of the rank's queries against the source's first chunk, fully visible (``is_causal=False``);
- s > r: the rank's second chunk of queries against the whole source shard, fully visible
  (``is_causal=False``); the merge updates that half only.

Without load balancing (contiguous shards) a causal step with s > r sees nothing and PyTorch skips it
(compute; the KV still moves); non-causal attention requires ``load_balance=False`` (PyTorch's rule).

Gradients: the backward ring calls ``torch.ops.omnisparse.attention_backward`` per step with the merged
output and lse, which gives that step's exact share of the merged attention's gradients (the
flash-attention contract; `method.omnisparse_attention_backward`), recomputing the step's selection from
the same inputs as its forward: the same selection.

Every step must run the op's sparse path, whose backward takes a merged (out, lse): a config in
``mode="dense"``, or a global key length under ``min_seq_len``, runs every step exact (tau = 1, no
query selection: every allowed block) through the sparse kernel; ``min_seq_len`` is compared with the
global key length, not the shard's. Other dense reasons of `method.decide` (a half-shard shorter than
a block, an unsupported dtype or head dim) raise ``ValueError`` before any communication.

Entry points:
- `context_parallel_attention` (function) / the op ``omnisparse::context_parallel_attention``;
- `backend` (a torch.compile backend: the omnisparse passes, then every op site onto the ring);
- `set_context_parallel`: a transformers model's attention as ``attn_implementation="omnisparse_cp"``
  (transformers' attention interface);
- `shard` / `unshard` (PyTorch's load balancer and sharding).

PyTorch's engine is private API: every use of it is in `_Engine` (checked on torch 2.11 and 2.13).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.fx import GraphModule

from . import ops  # noqa: F401  (registers torch.ops.omnisparse.attention and its backward)
from .backend import lower
from .config import OmniSparseConfig
from .kernels.triton_utils import MAX_HEAD_DIM
from .method import decide
from .passes import PassReport, run_passes
from .passes.attention_site import ATTENTION, attention_args

ATTN_IMPLEMENTATION = "omnisparse_cp"
GROUP_ATTRIBUTE = "omnisparse_cp_group"
LOAD_BALANCE_ATTRIBUTE = "omnisparse_cp_load_balance"
_SEQ_DIM = 2
_GRAPH_IDS = itertools.count()


class _Engine:
    """PyTorch's context-parallel engine: the one place that touches its private API.

    ``torch.distributed.tensor.experimental._context_parallel`` (torch >= 2.9; the same names in 2.11
    and 2.13: 2.13 only turned asserts into raises and renamed one collective): the templated ring
    forward and backward, the options object ``_cp_options`` (load balancing, rotate method, fp32
    merge), the head-tail load balancer, the sharding of buffers; and c10d's process-group names
    (``_get_process_group_name``, ``_resolve_process_group``), which let a custom op carry its group
    as a string.
    """

    @staticmethod
    def module() -> Any:
        try:
            from torch.distributed.tensor.experimental._context_parallel import _attention
        except ImportError as error:  # pragma: no cover (torch < 2.9)
            raise ImportError(
                f"omnicompile.context_parallel needs torch's context-parallel engine (torch >= 2.11), "
                f"torch {torch.__version__} has none"
            ) from error
        return _attention

    @staticmethod
    @contextlib.contextmanager
    def load_balance(enabled: bool) -> Iterator[None]:
        """PyTorch's global ``enable_load_balance`` set to ``enabled`` inside the block, restored after."""
        options = _Engine.module()._cp_options
        saved = options.enable_load_balance
        options.enable_load_balance = enabled
        try:
            yield
        finally:
            options.enable_load_balance = saved

    @staticmethod
    def balancer(seq_len: int, world: int, device: torch.device) -> Any:
        from torch.distributed.tensor.experimental._context_parallel._load_balancer import (
            _HeadTailLoadBalancer,
        )

        return _HeadTailLoadBalancer(seq_len, world, device)

    @staticmethod
    def shard(mesh: DeviceMesh, tensors: list[Tensor], dims: list[int], balancer: Any) -> list[Tensor]:
        return _Engine.module()._context_parallel_buffers(mesh, tensors, dims, balancer)

    @staticmethod
    def unshard(mesh: DeviceMesh, tensors: list[Tensor], dims: list[int], balancer: Any) -> list[Tensor]:
        return _Engine.module().context_parallel_unshard(mesh, tensors, dims, balancer)

    @staticmethod
    def ring_forward(group: dist.ProcessGroup, step: Callable, q: Tensor, k: Tensor, v: Tensor,
                     is_causal: bool, **kwargs: Any) -> tuple[Tensor, ...]:  # fmt: skip
        return _Engine.module()._templated_ring_attention(
            group, _SEQ_DIM, step, q, k, v, is_causal=is_causal, **kwargs
        )

    @staticmethod
    def ring_backward(group: dist.ProcessGroup, step: Callable, grad_out: Tensor, q: Tensor, k: Tensor,
                      v: Tensor, out: Tensor, lse: Tensor, is_causal: bool,
                      **kwargs: Any) -> tuple[Tensor, ...]:  # fmt: skip
        return _Engine.module()._templated_ring_attention_backward(
            group, _SEQ_DIM, step, grad_out, "grad_out", q, k, v, out, lse, is_causal, **kwargs
        )

    @staticmethod
    def group_name(mesh: DeviceMesh | dist.ProcessGroup) -> str:
        group = mesh.get_group() if isinstance(mesh, DeviceMesh) else mesh
        return dist.distributed_c10d._get_process_group_name(group)

    @staticmethod
    def group(name: str) -> dist.ProcessGroup:
        return dist.distributed_c10d._resolve_process_group(name)


def _mesh_1d(mesh: DeviceMesh) -> DeviceMesh:
    if not isinstance(mesh, DeviceMesh) or mesh.ndim != 1:
        raise ValueError(f"context parallelism needs a 1-D DeviceMesh, got {mesh!r}")
    return mesh


def _balancer(mesh: DeviceMesh, seq_len: int, device: torch.device, load_balance: bool) -> Any:
    world = mesh.size()
    parts = 2 * world if load_balance else world
    if seq_len % parts:
        raise ValueError(
            f"sequence length {seq_len} is not a multiple of {parts} "
            f"({'2 x ' if load_balance else ''}{world} ranks{', head-tail chunks' if load_balance else ''})"
        )
    return _Engine.balancer(seq_len, world, device) if load_balance else None


def shard(
    mesh: DeviceMesh, tensors: Sequence[Tensor], seq_dims: Sequence[int], load_balance: bool = True
) -> list[Tensor]:
    """This rank's shards of ``tensors`` (each whole on every rank, the same on all), cut along ``seq_dims``.

    ``load_balance=True``: PyTorch's head-tail rearrangement first (rank r gets chunks r and 2W - 1 - r
    of 2W; the sequence length a multiple of 2W), as its ``context_parallel`` does for causal SDPA;
    else contiguous shards (a multiple of W). No communication; not differentiable (shard leaves).
    Example: q [B, H, S, D] -> [B, H, S / W, D] with ``seq_dims=[2]``; position ids [B, S] with ``[1]``.
    """
    mesh = _mesh_1d(mesh)
    tensors = list(tensors)
    seq_len = tensors[0].shape[seq_dims[0]]
    if any(t.shape[d] != seq_len for t, d in zip(tensors, seq_dims)) or len(tensors) != len(seq_dims):
        raise ValueError("shard: one sequence dim per tensor, every one of the same length")
    balancer = _balancer(mesh, seq_len, tensors[0].device, load_balance)
    with torch.no_grad():
        return _Engine.shard(mesh, tensors, list(seq_dims), balancer)


def unshard(
    mesh: DeviceMesh, tensors: Sequence[Tensor], seq_dims: Sequence[int], load_balance: bool = True
) -> list[Tensor]:
    """The whole tensors, on every rank, from this rank's shards (`shard`'s inverse; an all-gather).

    ``load_balance`` must be what `shard` used. Not differentiable.
    """
    mesh = _mesh_1d(mesh)
    tensors = list(tensors)
    seq_len = tensors[0].shape[seq_dims[0]] * mesh.size()
    balancer = _balancer(mesh, seq_len, tensors[0].device, load_balance)
    with _Engine.load_balance(load_balance):  # torch falls back to its default balancer on None
        return _Engine.unshard(mesh, tensors, list(seq_dims), balancer)


def step_config(config: OmniSparseConfig, kv_len: int) -> OmniSparseConfig:
    """The config of every ring step for a global key length ``kv_len`` (module docstring).

    ``min_seq_len`` is the global length's business: the steps get 0. ``max_head_dim`` is a speed rule
    of one op call; a step must run the sparse kernel (its lse merges), so the steps take every head
    dim the kernels do (`MAX_HEAD_DIM`). ``mode="dense"`` or a short sequence gives the exact config
    (tau = 1, no query selection: every allowed block).
    """
    steps = config.replace(min_seq_len=0, max_head_dim=max(config.max_head_dim, MAX_HEAD_DIM))
    if config.mode == "dense" or kv_len < config.min_seq_len:
        return steps.replace(mode="sparse", tau=1.0, query_selection=False)
    return steps


def _check_steps(q: Tensor, k: Tensor, v: Tensor, config: OmniSparseConfig, load_balance: bool) -> None:
    """``ValueError`` unless every step's call (module docstring) takes the op's sparse path."""
    shapes = [(q, k, v)]
    if load_balance:
        q_half, kv_half = q.shape[2] // 2, k.shape[2] // 2
        shapes += [(q, k[:, :, :kv_half], v[:, :, :kv_half]), (q[:, :, q_half:], k, v)]
    for step_q, step_k, step_v in shapes:
        decision = decide(step_q, step_k, step_v, None, config)
        if decision.path != "sparse":
            raise ValueError(
                f"context_parallel_attention: a ring step of q {tuple(step_q.shape)}, "
                f"k {tuple(step_k.shape)} would run dense attention ({decision.reason}), whose backward "
                "cannot take the merged output; use torch's context_parallel with SDPA for these inputs"
            )


def _step_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    config: str,
    site: str,
    softcap: float | None,
) -> tuple[Tensor, Tensor]:
    """One ring step: the op over the visiting KV shard, (out [B, H, Sq, Dv], lse float32 [B, H, Sq])."""
    return torch.ops.omnisparse.attention(
        q, k, v, None, 0.0, is_causal, scale, enable_gqa, config, site, None, None, softcap, need_lse=True
    )


def _step_backward(*, grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor,
                   logsumexp: Tensor, is_causal: bool, scale: float | None, enable_gqa: bool, config: str,
                   softcap: float | None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """One backward ring step: this step's share (dq, dk, dv) of the merged attention's gradients."""
    return torch.ops.omnisparse.attention_backward(
        grad_out.contiguous(), query, key, value, None, out.contiguous(), logsumexp.contiguous(),
        is_causal, scale, enable_gqa, config, None, None, softcap,
    )  # fmt: skip


@torch.library.custom_op("omnisparse::context_parallel_attention", mutates_args=())
def context_parallel_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    config: str,
    site: str,
    group: str,
    load_balance: bool,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The ring over the group named ``group`` with the op at every step; see `context_parallel_attention`."""
    pg = _Engine.group(group)
    ops.check_inputs(q, k, v, None, 0.0, enable_gqa)
    cfg = step_config(OmniSparseConfig.from_json(config), k.shape[2] * pg.size())
    _check_steps(q, k, v, cfg, load_balance)
    step = dict(scale=scale, enable_gqa=enable_gqa, config=cfg.to_json(), softcap=softcap)
    with _Engine.load_balance(load_balance):
        out, lse = _Engine.ring_forward(pg, _step_forward, q, k, v, is_causal, site=site, **step)
    return out.contiguous(), lse.contiguous()


@context_parallel_attention_op.register_fake
def _context_parallel_attention_fake(q, k, v, *_args, **_kwargs):
    batch, heads, q_len, _ = q.shape
    return q.new_empty((batch, heads, q_len, v.shape[-1])), q.new_empty(
        (batch, heads, q_len), dtype=torch.float32
    )


@torch.library.custom_op("omnisparse::context_parallel_attention_backward", mutates_args=())
def context_parallel_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    config: str,
    group: str,
    load_balance: bool,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv), shaped like this rank's q, k, v shards, by PyTorch's backward ring."""
    pg = _Engine.group(group)
    cfg = step_config(OmniSparseConfig.from_json(config), k.shape[2] * pg.size())
    step = dict(scale=scale, enable_gqa=enable_gqa, config=cfg.to_json(), softcap=softcap)
    with _Engine.load_balance(load_balance):
        grads = _Engine.ring_backward(pg, _step_backward, grad_out, q, k, v, out, lse, is_causal, **step)
    dq, dk, dv = grads[:3]
    return dq.contiguous(), dk.clone(), dv.clone()  # dk and dv are views of one buffer


@context_parallel_attention_backward.register_fake
def _context_parallel_attention_backward_fake(grad_out, q, k, v, *_args, **_kwargs):
    return tuple(t.new_empty(t.shape) for t in (q, k, v))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, is_causal, scale, enable_gqa, config, _site, group, load_balance, softcap = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (is_causal, scale, enable_gqa, config, group, load_balance, softcap)


def _backward(ctx, grad_out: Tensor, _grad_lse: Tensor):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = context_parallel_attention_backward(grad_out.contiguous(), q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, *(None,) * 8


context_parallel_attention_op.register_autograd(_backward, setup_context=_setup_context)


def context_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mesh: DeviceMesh,
    *,
    is_causal: bool = True,
    scale: float | None = None,
    enable_gqa: bool = False,
    config: OmniSparseConfig | None = None,
    site: str = "cp",
    softcap: float | None = None,
    load_balance: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """OmniSparse attention of this rank's query shard over the whole sequence's keys, by PyTorch's ring.

    Args:
        q: [B, H, S / W, D]; k, v: [B, Hkv, S / W, D] (Dv = D): this rank's shards (`shard`, with the
            same ``load_balance``); float32, float16 or bfloat16; H a multiple of Hkv (``enable_gqa``).
        mesh: the 1-D device mesh of the W ranks (gloo on the CPU, NCCL on CUDA).
        is_causal: global causal attention (query position p sees keys <= p); False needs
            ``load_balance=False``. No mask, window or dropout.
        scale, softcap: as the op (SDPA's scale; Gemma 2's logit cap).
        config: the op's config (default `OmniSparseConfig()`); steps get `step_config`'s.
        load_balance: how the shards were cut (default: ``is_causal``).

    Returns:
        out [B, H, S / W, D] in q.dtype and lse float32 [B, H, S / W] (natural log, over all keys
        attended), this rank's rows. Differentiable with respect to q, k, v (the lse is not); every
        rank must run the forward and the backward (collectives).
    """
    load_balance = is_causal if load_balance is None else load_balance
    config_json = (config or OmniSparseConfig()).to_json()
    group = _Engine.group_name(_mesh_1d(mesh))
    return torch.ops.omnisparse.context_parallel_attention(
        q, k, v, is_causal, scale, enable_gqa, config_json, site, group, load_balance, softcap
    )


CP_ATTENTION = torch.ops.omnisparse.context_parallel_attention.default


def to_context_parallel(gm: GraphModule, group: str, load_balance: bool = True) -> bool:
    """Replace every ``omnisparse.attention`` call of ``gm`` by ``omnisparse.context_parallel_attention``
    over the group named ``group``; whether anything changed.

    Raises ``NotImplementedError`` for a call with a mask, a mask check or a window (each rank holds a
    shard: no mask of the whole sequence exists in the graph) and for a non-causal call with
    ``load_balance`` (PyTorch's ring balances causal attention only).
    """
    changed = False
    for node in list(gm.graph.find_nodes(op="call_function", target=ATTENTION)):
        args = attention_args(node)
        if args["attn_mask"] is not None or args["mask_check"] is not None or args["window"] is not None:
            raise NotImplementedError(
                f"context parallelism: attention site {args['site']} has a mask or window; only causal "
                "or unmasked attention is supported"
            )
        if load_balance and args["is_causal"] is not True:
            raise NotImplementedError(
                f"context parallelism: attention site {args['site']} is not causal; load balancing needs "
                "causal attention (shard contiguously and pass load_balance=False)"
            )
        cp_args = [args[name] for name in ("q", "k", "v", "is_causal", "scale", "enable_gqa")]
        cp_args += [args["config"], args["site"], group, load_balance, args["softcap"]]
        with gm.graph.inserting_before(node):
            replacement = gm.graph.call_function(CP_ATTENTION, tuple(cp_args))
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def backend(
    mesh: DeviceMesh,
    config: OmniSparseConfig | None = None,
    *,
    load_balance: bool = True,
    reports: list[PassReport] | None = None,
) -> Callable[..., Any]:
    """A torch.compile backend: the omnisparse backend's passes, then `to_context_parallel` on ``mesh``.

    The compiled model gets this rank's shards (`shard`: inputs, position ids) and returns this rank's
    rows. An attention site the passes leave untouched raises ``NotImplementedError`` (it would attend
    within the shard only), as does a site `to_context_parallel` rejects.
    """
    cfg = config or OmniSparseConfig()
    group = _Engine.group_name(_mesh_1d(mesh))

    def omnisparse_context_parallel(
        gm: GraphModule,
        example_inputs: Sequence[Any],
        *,
        options: dict[str, Any] | None = None,
        mode: str | None = None,
    ) -> Callable[..., Any]:
        site_cfg = cfg.replace(**options) if options else cfg
        report = run_passes(gm, site_cfg, site_prefix=f"cp{next(_GRAPH_IDS)}.")
        untouched = [f"{s.site}: {s.reason}" for s in report.sites if s.status != "replaced"]
        if untouched:
            raise NotImplementedError(
                f"context parallelism: attention left untouched ({'; '.join(untouched)})"
            )
        to_context_parallel(report.graph_module, group, load_balance)
        if reports is not None:
            reports.append(report)
        return lower(report.graph_module, example_inputs, site_cfg, mode)

    return omnisparse_context_parallel


def set_context_parallel(
    model: torch.nn.Module,
    mesh: DeviceMesh,
    config: OmniSparseConfig | None = None,
    load_balance: bool = True,
) -> None:
    """Make the transformers ``model`` run its attention on ``mesh``: ``attn_implementation="omnisparse_cp"``.

    Registers the implementation (`register_attention`), switches the model to it
    (``model.set_attn_implementation``; ``"sdpa"`` switches back) and stores the group name,
    ``load_balance`` and the config JSON in the model config (and its decoder text config). The model
    then takes this rank's shards of ``input_ids`` and of ``position_ids`` (`shard` of ``arange(S)``:
    required, the default positions would be the shard's), ``attention_mask=None`` and
    ``use_cache=False``; it returns this rank's rows (`unshard` the logits).
    """
    from .hf_attention import CONFIG_ATTRIBUTE

    register_attention()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    for model_config in (model.config, model.config.get_text_config(decoder=True)):
        setattr(model_config, CONFIG_ATTRIBUTE, (config or OmniSparseConfig()).to_json())
        setattr(model_config, GROUP_ATTRIBUTE, _Engine.group_name(_mesh_1d(mesh)))
        setattr(model_config, LOAD_BALANCE_ATTRIBUTE, load_balance)


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
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The ``"omnisparse_cp"`` attention function (transformers' AttentionInterface signature).

    query [B, H, n, D], key and value [B, Hkv, n, D]: this rank's shards; returns [B, n, H, D] and no
    weights. ``ValueError`` for a mask, dropout, a sliding window, a non-causal layer, attention sinks or
    a position bias, or a model without `set_context_parallel`.
    """
    from .hf_attention import CONFIG_ATTRIBUTE

    group = getattr(module.config, GROUP_ATTRIBUTE, None)
    if group is None:
        raise ValueError(
            f"{ATTN_IMPLEMENTATION}: call omnicompile.context_parallel.set_context_parallel first"
        )
    unsupported = [name for name in ("position_bias", "s_aux") if kwargs.get(name) is not None]
    if attention_mask is not None or dropout or sliding_window is not None or unsupported:
        raise ValueError(
            f"{ATTN_IMPLEMENTATION} attention supports unpadded causal attention only (attention_mask "
            f"{'given' if attention_mask is not None else 'None'}, dropout {dropout}, sliding_window "
            f"{sliding_window}, {unsupported or 'no sinks or bias'})"
        )
    if not (getattr(module, "is_causal", True) if is_causal is None else is_causal):
        raise ValueError(f"{ATTN_IMPLEMENTATION} attention supports causal layers only")
    out, _ = torch.ops.omnisparse.context_parallel_attention(
        query,
        key,
        value,
        True,
        scaling,
        query.shape[1] != key.shape[1],
        getattr(module.config, CONFIG_ATTRIBUTE, None) or OmniSparseConfig().to_json(),
        f"hf_cp.layer{getattr(module, 'layer_idx', '')}",
        group,
        getattr(module.config, LOAD_BALANCE_ATTRIBUTE, True),
        kwargs.get("softcap"),
    )
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Register `attention_forward` as ``"omnisparse_cp"`` in transformers' AttentionInterface.

    No mask function is registered: transformers then builds no mask and passes ``attention_mask``
    through (None for an unpadded prompt), and never reads the shard's jumping position ids as packed
    sequences.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)
