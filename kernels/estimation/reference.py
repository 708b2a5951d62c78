"""Block estimators (METHOD.md section 1), pure PyTorch, fp32 math, chunked over query blocks: the
reference of the fused kernels (`triton_composite.estimate_blocks`, `triton_probe.probe_block_mass`,
the same names here).

Every estimator returns Ahat, float32 [B, H, nq, nk]: for each query block i a distribution over the
key blocks j allowed by the mask (>= 0, sums to 1 over allowed j, exactly 0 on disallowed j; a query
block whose rows are all fully masked gets an all-zero row).

Common scheme. Queries and keys are summarised in groups of ``group`` consecutive tokens (a group
never straddles a block). For a query group u and key group w the score is

    score(u, w) = score_scale * qsum_u . ksum_w + c(u, w),
    c(u, w)     = log sum_{r in u, c in w} exp(bias[r, c]),

where bias is the fp32 mask bias of ``masks.mask_bias`` (0 keep, -inf masked or padding, or the
additive mask value). Without a mask c = log(rows in u) + log(keys in w): the per-query term cancels
in the softmax, leaving the count correction log(g) (fewer for a partial last group). With causality
or a bool mask c is the log of the number of unmasked entries of the g x g tile; an additive bias
enters as the log-mean-exp of exp(bias) over the tile times its size. The similarity term is
mask-blind (the summaries average all tokens of a group); the mask acts through c only, so a key
group whose tile is fully masked gets exactly zero probability. Each query group takes a softmax over
all key groups; probabilities are summed per key block and averaged over the query block's groups
that see at least one key.

Estimators (g = ``granularity``, s = ``antidiagonal_stride``):
- ``composite``: qsum, ksum are the means of the real tokens of a group; group = g, score_scale = scale.
- ``pooled``: ``composite`` with g = block_size.
- ``antidiagonal`` (XAttention-style): qsum of a stride group is its s query rows in reverse order and
  ksum its s key rows, concatenated to s*D vectors, so qsum . ksum is the sum of the s anti-diagonal
  products of the s x s tile; group = s, score_scale = scale / s (the anti-diagonal mean).
- composite at g = 1 is exact attention (``omnicompile.metrics.exact_block_mass``).

``softcap`` (the logit soft-cap, `softcap` module): the similarity term score_scale * qsum . ksum is
capped before c(u, w) is added, as attention caps its scores before the mask. Exact at g = 1 (and so
for the row probe); for larger groups it caps the summary score, not each score of the tile: an
approximation (METHOD.md section 1).

Row probe (`probe_block_mass`, mixed in by `with_row_probe` when ``EstimationParams.row_probe``): the
exact block distribution of one query row per query block, mixed into Ahat. Composite tokens score a
tile by exp(scale * qmean . kmean), the exponential of its mean score, a lower bound (Jensen) of the
tile's mean exp(score) that is loosest where scores spread widely inside the tile. On Gemma 3's
sliding-window heads (scores spread over ~+-60 in a 16 x 16 tile) that bound puts 0.99+ of a block's
mass on the diagonal block where the exact mass is 0.2-0.45, so the lazy rule fires on blocks that
attend across their whole window. The probe measures, exactly, one row per query block (its last
real row) and the estimate becomes the mean of the two distributions: a block is lazy only when both
its composite estimate and its probe row keep tau on the local path, and blocks the probe row needs
are ranked by at least half its mass on them. Cost: Sq / block_size rows of exact scores
(1/block_size of dense attention's QK^T), chunked. On CUDA without a mask `with_row_probe` runs the
fused kernel of ``triton_probe`` instead (same result up to rounding; no [rows, Skv] score matrix).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ..masks import check_qkv, check_window, mask_bias, resolve_scale, validate_mask
from ..softcap import check_softcap, soft_cap
from . import triton_probe
from .params import EstimationParams

# (padded fp32 chunk [B, H, P, D], position of its first row) -> group summaries [B, H, P / group, D'].
Summary = Callable[[torch.Tensor, int], torch.Tensor]


def _padded_rows(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """fp32 rows [start, stop) of x [B, H, S, D], zero-padded past S: [B, H, stop - start, D]."""
    rows = x[:, :, start : min(stop, x.shape[2])].float()
    return torch.nn.functional.pad(rows, (0, 0, 0, stop - start - rows.shape[2]))


def _group_mean(x: torch.Tensor, start: int, seq_len: int, group: int) -> torch.Tensor:
    """Means of the real tokens of each group of a padded chunk x [B, H, P, D] starting at ``start``."""
    batch, heads, length, dim = x.shape
    sums = x.view(batch, heads, length // group, group, dim).sum(3)
    starts = start + torch.arange(length // group, device=x.device) * group
    counts = (seq_len - starts).clamp(1, group)
    return sums / counts[:, None].to(sums.dtype)


def composite_means(x: torch.Tensor, group: int) -> torch.Tensor:
    """Means of consecutive groups of ``group`` tokens: x [B, Hx, S, D] -> [B, Hx, ceil(S/group), D]
    in x.dtype (accumulated in fp32; the last group averages its real tokens only): the composite tokens of
    a whole sequence, as the fused estimator (`triton_composite`) reads them."""
    if x.shape[2] % group == 0:
        return x.unflatten(2, (-1, group)).mean(3)
    full = x.shape[2] // group
    out = torch.empty(*x.shape[:2], -(-x.shape[2] // group), x.shape[3], dtype=x.dtype, device=x.device)
    out[:, :, :full] = x[:, :, : full * group].unflatten(2, (full, group)).sum(3, dtype=torch.float32) / group
    if x.shape[2] % group:
        out[:, :, full:] = x[:, :, full * group :].float().mean(2, keepdim=True)
    return out


def _stride_rows(x: torch.Tensor, start: int, stride: int, reverse: bool) -> torch.Tensor:
    """Concatenate each group of ``stride`` rows of x [B, H, P, D] (reversed if asked): [B, H, P/s, s*D].

    ``start`` is unused: padding rows are zero, so partial groups need no count.
    """
    batch, heads, length, dim = x.shape
    groups = x.view(batch, heads, length // stride, stride, dim)
    return (groups.flip(3) if reverse else groups).reshape(batch, heads, length // stride, stride * dim)


def _log_counts(
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    q_len: int,
    kv_len: int,
    group: int,
    row_start: int,
    num_rows: int,
    num_keys: int,
    device: torch.device,
    window: int | None = None,
) -> torch.Tensor:
    """c(u, w) of the module docstring for rows [row_start, row_start + num_rows) and keys [0, num_keys).

    ``window`` (causal, no mask): row r counts only keys in (r - window, r].
    Returns float32 [Bm, Hm, num_rows / group, num_keys / group] (Bm, Hm: the mask's batch/head sizes or 1).
    """
    if attn_mask is None:
        rows = row_start + torch.arange(num_rows, device=device).view(-1, group, 1)
        first_key = torch.arange(0, num_keys, group, device=device)
        end_key = (first_key + group).clamp(max=kv_len)
        stop = torch.minimum(rows + 1, end_key) if is_causal else end_key
        start = first_key if window is None else torch.maximum(first_key, rows - window + 1)
        visible = (stop - start).clamp(min=0) * (rows < q_len)
        return visible.sum(1).float().log()[None, None]
    q_pos = (row_start + torch.arange(num_rows, device=device)).view(1, 1, -1, 1)
    k_pos = torch.arange(num_keys, device=device).view(1, 1, 1, -1)
    bias = mask_bias(attn_mask, False, q_len, kv_len, q_pos, k_pos)
    tiles = bias.view(bias.shape[0], bias.shape[1], num_rows // group, group, num_keys // group, group)
    return tiles.logsumexp(dim=(3, 5))


@torch.no_grad()
def _grouped_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    score_scale: float,
    block_size: int,
    group: int,
    query_chunk: int,
    summarise_q: Summary,
    summarise_k: Summary,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The common scheme of the module docstring: float32 [B, H, nq, nk]; ``window``: causal
    sliding window (``masks``), applied through the counts c(u, w); ``softcap``: the similarity
    term capped."""
    batch, heads, q_len = q.shape[:3]
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if block_size % group:
        raise ValueError(f"group size {group} does not divide block_size {block_size}")
    if query_chunk < 1:
        raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")
    nq, nk = -(-q_len // block_size), -(-kv_len // block_size)
    per_block = block_size // group
    k_sum = summarise_k(_padded_rows(k, 0, nk * block_size), 0).unsqueeze(2).transpose(-1, -2)
    ahat = torch.empty(batch, heads, nq, nk, dtype=torch.float32, device=q.device)
    for i0 in range(0, nq, query_chunk):
        i1 = min(i0 + query_chunk, nq)
        rows = (i1 - i0) * block_size
        q_sum = summarise_q(_padded_rows(q, i0 * block_size, i1 * block_size), i0 * block_size)
        q_sum = q_sum.view(batch, kv_heads, heads // kv_heads, q_sum.shape[2], q_sum.shape[3])
        scores = torch.matmul(q_sum, k_sum).view(batch, heads, -1, nk * per_block) * score_scale
        scores = soft_cap(scores, softcap)
        scores = scores + _log_counts(
            attn_mask,
            is_causal,
            q_len,
            kv_len,
            group,
            i0 * block_size,
            rows,
            nk * block_size,
            q.device,
            window,
        )
        row_max = scores.amax(dim=-1, keepdim=True)
        seen = torch.isfinite(row_max)
        probs = torch.exp(scores - torch.where(seen, row_max, 0.0))
        probs = probs / torch.where(seen, probs.sum(dim=-1, keepdim=True), 1.0)
        block_probs = probs.view(batch, heads, -1, nk, per_block).sum(-1)
        block_sums = block_probs.view(batch, heads, i1 - i0, per_block, nk).sum(3)
        groups_seen = seen.view(seen.shape[0], seen.shape[1], i1 - i0, per_block).sum(-1, keepdim=True)
        ahat[:, :, i0:i1] = block_sums / groups_seen.clamp(min=1)
    return ahat


def composite_estimate(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    block_size: int,
    granularity: int,
    query_chunk: int,
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """UniSparse composite-token estimate, float32 [B, H, nq, nk] (module docstring).

    q: [B, H, Sq, D], k: [B, Hkv, Skv, D] (GQA by h // (H // Hkv)); any float dtype; attn_mask bool
    or additive, broadcastable to [B, H, Sq, Skv]; granularity g divides block_size; ``window``: causal
    sliding window (``masks`` module docstring); ``softcap``: logit soft-cap (module docstring).
    Inputs unchecked here, as in every estimator of this module (`estimate_blocks` checks them).
    """
    return _grouped_block_mass(
        q,
        k,
        attn_mask,
        is_causal,
        scale,
        block_size,
        granularity,
        query_chunk,
        functools.partial(_group_mean, seq_len=q.shape[2], group=granularity),
        functools.partial(_group_mean, seq_len=k.shape[2], group=granularity),
        window,
        softcap,
    )


def pooled_estimate(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    block_size: int,
    query_chunk: int,
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Block-mean estimate: ``composite_estimate`` at granularity = block_size."""
    return composite_estimate(
        q, k, attn_mask, is_causal, scale, block_size, block_size, query_chunk, window=window, softcap=softcap
    )


def antidiagonal_estimate(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    block_size: int,
    stride: int,
    query_chunk: int,
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """XAttention-style strided anti-diagonal estimate, float32 [B, H, nq, nk] (module docstring)."""
    return _grouped_block_mass(
        q,
        k,
        attn_mask,
        is_causal,
        scale / stride,
        block_size,
        stride,
        query_chunk,
        functools.partial(_stride_rows, stride=stride, reverse=True),
        functools.partial(_stride_rows, stride=stride, reverse=False),
        window,
        softcap,
    )


def estimate_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    params: EstimationParams,
    *,
    window: int | None = None,
    softcap: float | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Ahat float32 [B, H, nq, nk] by ``params.estimator`` at ``params.block_size``, chunked by
    ``params.query_chunk``, mixed with the exact row probe when ``params.row_probe`` (`with_row_probe`);
    scale ``None`` = 1 / sqrt(D) (as SDPA); ``window``: causal sliding window (``masks`` module
    docstring), zero mass on blocks wholly outside the band; ``softcap``: logit soft-cap (module
    docstring). Checks q, k, the mask, the window and the cap (``ValueError``) unless ``check=False``
    (inputs its caller has checked: ``method.AttentionInputs``)."""
    if check:
        batch, heads, _, q_len, kv_len = check_qkv(q, k)
        validate_mask(attn_mask, is_causal, batch, heads, q_len, kv_len)
        check_window(window, is_causal, attn_mask)
        check_softcap(softcap)
    b, chunk = params.block_size, params.query_chunk
    scale = resolve_scale(scale, q.shape[-1])
    options = {"window": window, "softcap": softcap}
    if params.estimator == "composite":
        ahat = composite_estimate(q, k, attn_mask, is_causal, scale, b, params.granularity, chunk, **options)
    elif params.estimator == "pooled":
        ahat = pooled_estimate(q, k, attn_mask, is_causal, scale, b, chunk, **options)
    else:
        ahat = antidiagonal_estimate(
            q, k, attn_mask, is_causal, scale, b, params.antidiagonal_stride, chunk, **options
        )
    if not params.row_probe:
        return ahat
    return with_row_probe(ahat, q, k, attn_mask, is_causal, scale, b, **options)


@torch.no_grad()
def probe_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    block_size: int,
    chunk_elements: int = 1 << 26,
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """float32 [B, H, nq, nk]: exact attention mass on each key block of query block i's last real row.

    q: [B, H, Sq, D]; k: [B, Hkv, Skv, D] (GQA by h // (H // Hkv)); attn_mask None, bool or additive,
    broadcastable to [B, H, Sq, Skv] (checked by the caller); ``window``: causal sliding window (``masks``);
    ``softcap``: logit soft-cap of the scores (`softcap` module; exact). A row that sees no key gets zeros.
    Rows are scored in chunks of at most ``chunk_elements`` scores (B * H * rows * Skv; 256 MiB fp32
    by default: three chunks at 32K tokens and 9 heads), so the probe costs a few launches.
    """
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    nq, nk = -(-q_len // block_size), -(-kv_len // block_size)
    rows = (torch.arange(1, nq + 1, device=q.device) * block_size).clamp(max=q_len) - 1
    keys = k.float().transpose(-1, -2).unsqueeze(2)  # [B, Hkv, 1, D, Skv]
    k_pos = torch.arange(nk * block_size, device=q.device).view(1, 1, 1, -1)
    out = torch.empty(batch, heads, nq, nk, dtype=torch.float32, device=q.device)
    query_chunk = max(1, chunk_elements // (batch * heads * nk * block_size))
    for i0 in range(0, nq, query_chunk):
        chunk_rows = rows[i0 : i0 + query_chunk]
        q_rows = q[:, :, chunk_rows].float().view(batch, kv_heads, heads // kv_heads, -1, dim)
        scores = soft_cap(torch.matmul(q_rows, keys).view(batch, heads, -1, kv_len) * scale, softcap)
        scores = torch.nn.functional.pad(scores, (0, nk * block_size - kv_len))
        scores = scores + mask_bias(
            attn_mask, is_causal, q_len, kv_len, chunk_rows.view(1, 1, -1, 1), k_pos, window=window
        )
        row_max = scores.amax(-1, keepdim=True)
        seen = torch.isfinite(row_max)
        probs = torch.exp(scores - torch.where(seen, row_max, 0.0))
        probs = probs / torch.where(seen, probs.sum(-1, keepdim=True), 1.0)
        out[:, :, i0 : i0 + query_chunk] = probs.view(*probs.shape[:3], nk, block_size).sum(-1)
    return out


def with_row_probe(
    ahat: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    block_size: int,
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """(ahat + probe) / 2 where the probe row sees a key, else ahat: float32 [B, H, nq, nk], a
    distribution over the allowed blocks wherever ahat is one (the probe row's keys are allowed).
    On CUDA, where `triton_probe` takes the inputs, its kernels probe and mix in one go, writing the
    result into a contiguous ``ahat`` (the callers' fresh estimate); elsewhere `probe_block_mass`."""
    if q.is_cuda and triton_probe.supported(q, k, attn_mask) is None:
        return triton_probe.probe_block_mass(
            q,
            k,
            attn_mask,
            is_causal,
            scale,
            block_size,
            window=window,
            softcap=softcap,
            ahat=ahat.contiguous(),
        )
    probe = probe_block_mass(q, k, attn_mask, is_causal, scale, block_size, window=window, softcap=softcap)
    seen = probe.sum(-1, keepdim=True) > 0
    return torch.where(seen, (ahat + probe) * 0.5, ahat)
