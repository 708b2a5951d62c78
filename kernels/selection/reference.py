"""Query selection and KV selection with a head-level shared budget (METHOD.md sections 2-3), pure
PyTorch: the reference of `triton_select` (the same `select_blocks`).

All on Ahat's device with vectorised torch ops and no host synchronisation: shapes depend only on
(B, H, nq, nk) and the parameters, never on data.
"""

from __future__ import annotations

import torch

from .block_selection import BlockSelection
from .params import SelectionCall, SelectionParams
from .transpose import block_mask_to_indices

# The selection stops once the float32 estimated mass reaches tau + MASS_SLACK, so the exact mass of
# what it takes reaches tau whenever the float32 sums err by less than this (a scan over a few
# thousand blocks errs by ~1e-6).
MASS_SLACK = 1e-5


def forced_pattern(
    num_q_blocks: int,
    num_kv_blocks: int,
    n_sink: int,
    n_local: int,
    is_causal: bool,
    device: torch.device | str,
) -> torch.Tensor:
    """bool [nq, nk]: the forced blocks F(i) before intersecting with the allowed blocks.

    Sinks are key blocks 0 .. n_sink-1. The local window holds n_local key blocks: i-n_local+1 .. i when
    causal; centred on i otherwise, i.e. i - n_local//2 .. i - n_local//2 + n_local - 1 (for the default
    n_local = 2 that is {i-1, i}, the same as the causal window, so a causal bool mask and
    ``is_causal`` force the same blocks). Key block i is the diagonal block (top-left alignment).
    """
    i = torch.arange(num_q_blocks, device=device)[:, None]
    j = torch.arange(num_kv_blocks, device=device)[None, :]
    first = i - n_local + 1 if is_causal else i - n_local // 2
    return (j < n_sink) | ((j >= first) & (j < first + n_local))


def shared_budget(need: torch.Tensor, scope: str, num_kv_heads: int) -> torch.Tensor:
    """Budget K int [B, H, nq] from the per-head need k_h int [B, H, nq] (0 for lazy heads) by budget scope:
    the max over the heads that share it (``"heads"``: all, ``"kv_group"``: a KV head's, ``"head"``: none)."""
    if scope == "head":
        return need
    batch, heads, nq = need.shape
    if scope == "heads":
        return need.amax(dim=1, keepdim=True).expand(batch, heads, nq)
    grouped = need.view(batch, num_kv_heads, heads // num_kv_heads, nq)
    return grouped.amax(dim=2, keepdim=True).expand_as(grouped).reshape(batch, heads, nq)


def full_final_blocks(
    lazy: torch.Tensor, take: torch.Tensor, num_available: torch.Tensor, dense_last_blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lazy, take) [B, H, nq] with the last ``dense_last_blocks`` query blocks active and taking
    every available block (so they attend to every allowed block, exact attention).

    The final rows of a prompt produce the next token; one of them can need a key block (a passkey's
    needle) that the block-averaged estimate ranks low. Cost: dense_last_blocks / nq of the rows.
    """
    final = torch.arange(lazy.shape[-1], device=lazy.device) >= lazy.shape[-1] - dense_last_blocks
    return lazy & ~final, torch.where(final, num_available, take)


def full_dense_heads(
    lazy: torch.Tensor,
    take: torch.Tensor,
    num_forced: torch.Tensor,
    num_available: torch.Tensor,
    max_density: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lazy, take) [B, H, nq] with every (b, h) whose selection would compute more than ``max_density``
    of its allowed blocks active in every query block and taking every available block instead.

    Such a head then runs exact attention through the same sparse kernel (its full schedule): at that
    density a sparse schedule saves little and the full one is exact. Decided on the device from the
    int counts [B, H, nq] (``num_forced + take`` selected of ``num_forced + num_available`` allowed),
    with no host synchronisation; ``max_density >= 1`` never fires. The test is in float32 (the counts
    and ``max_density`` rounded to float32, one float32 product), as the Triton selection computes it.
    """
    if max_density >= 1.0:
        return lazy, take
    selected = (num_forced + take).sum(-1, dtype=torch.int64).float()
    allowed = (num_forced + num_available).sum(-1, dtype=torch.int64).float()
    dense = (selected > allowed * max_density).unsqueeze(-1)
    return lazy & ~dense, torch.where(dense, num_available, take)


def take_counts(
    need: torch.Tensor,
    lazy: torch.Tensor,
    num_forced: torch.Tensor,
    num_available: torch.Tensor,
    params: SelectionParams,
    num_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lazy bool, take int32) [B, H, nq]: how many available blocks each (b, h, i) takes (`select_blocks`).

    From the per-head need k_h (0 where lazy), lazy and the forced / available block counts (int
    [B, H, nq] each): K shared by `budget_scope` (`shared_budget`) and clamped to [min_blocks,
    max_blocks]; lazy blocks take none; the final query blocks (`full_final_blocks`) and the heads
    denser than ``dense_fallback_density`` (`full_dense_heads`) take every available block.
    """
    budget = shared_budget(need, params.budget_scope, num_kv_heads)
    budget = budget.clamp(params.min_blocks, params.max_blocks)
    take = torch.where(lazy, 0, torch.minimum(budget, num_available))
    lazy, take = full_final_blocks(lazy, take, num_available, params.dense_last_blocks)
    lazy, take = full_dense_heads(lazy, take, num_forced, num_available, params.dense_fallback_density)
    return lazy, take.to(torch.int32)


def check_estimate(ahat: torch.Tensor, block_size: int, call: SelectionCall) -> None:
    """Raise ``ValueError`` unless ahat [B, H, nq, nk] has H a multiple of ``call.num_kv_heads`` and
    (nq, nk) = (ceil(Sq / b), ceil(Skv / b))."""
    num_kv_heads, _, q_len, kv_len = call
    _, heads, nq, nk = ahat.shape
    if heads % num_kv_heads:
        raise ValueError(f"query heads {heads} are not a multiple of kv heads {num_kv_heads}")
    if (nq, nk) != (-(-q_len // block_size), -(-kv_len // block_size)):
        raise ValueError(
            f"ahat blocks {(nq, nk)} do not match q_len {q_len}, kv_len {kv_len}, b {block_size}"
        )


def select_blocks(
    ahat: torch.Tensor, allowed: torch.Tensor, params: SelectionParams, call: SelectionCall
) -> BlockSelection:
    """Select key blocks per (b, h, i) from the estimate (METHOD.md sections 2-3).

    Args:
        ahat: float32 [B, H, nq, nk], the block estimate (a distribution over allowed blocks).
        allowed: bool, broadcastable to [B, H, nq, nk] (``masks.allowed_blocks``).
        params: the selection's parameters (`SelectionParams`).
        call: Hkv, causality, Sq and Skv of the attention call (`SelectionCall`).

    Rule: F(i) = forced & allowed. A (b, h, i) is lazy when query selection is on and its mass on F(i)
    is >= the lazy threshold; lazy blocks take F(i) only. An active block's need k_h is the smallest
    number of available (allowed, non-forced) blocks, in descending Ahat order (ties: lower index
    first), whose mass with F(i) reaches tau (all available blocks if it never does; all of them by
    definition when tau >= 1). K = the max of k_h over the heads sharing the budget, clamped to
    [min_blocks, max_blocks]; each active head takes F(i) plus its top min(K, available) blocks. The
    last ``dense_last_blocks`` query blocks take every allowed block (`full_final_blocks`), and so does
    every query block of a (b, h) whose selection would exceed ``dense_fallback_density`` of its allowed
    blocks (`full_dense_heads`).
    ``budget`` records that count (equal across the heads sharing K unless a per-head mask leaves a
    head fewer available blocks). Masses are summed in float32 with a slack of `MASS_SLACK`.
    """
    check_estimate(ahat, params.block_size, call)
    num_kv_heads, is_causal, q_len, kv_len = call
    batch, heads, nq, nk = ahat.shape
    pattern = forced_pattern(nq, nk, params.n_sink, params.n_local, is_causal, ahat.device)
    forced = allowed & pattern  # broadcast shape of `allowed`: [1, 1, nq, nk] for causal / no mask
    available = allowed & ~pattern
    local_mass = (ahat * forced).sum(-1)
    if params.query_selection:
        lazy = local_mass >= params.lazy_threshold
    else:
        lazy = torch.zeros_like(local_mass, dtype=torch.bool)
    num_available = available.sum(-1).expand(batch, heads, nq)
    ranked, order = torch.sort(torch.where(available, ahat, -1.0), dim=-1, descending=True, stable=True)
    if params.tau >= 1.0:
        need = num_available
    else:
        # need = 1 + the first rank at which the mass taken so far reaches tau (cumulative mass is
        # non-decreasing, so a binary search finds it); `MASS_SLACK` absorbs float32 rounding.
        cumulative = ranked.clamp(min=0.0).cumsum(-1)
        target = (params.tau + MASS_SLACK - local_mass).unsqueeze(-1)
        reached = torch.searchsorted(cumulative, target).squeeze(-1)
        need = torch.where(target.squeeze(-1) <= 0, 0, torch.minimum(reached + 1, num_available))
    num_forced = forced.sum(-1).expand(batch, heads, nq)
    need = torch.where(lazy, 0, need)
    lazy, take = take_counts(need, lazy, num_forced, num_available, params, num_kv_heads)
    # The first `take` entries of each ranked row are available blocks (take <= num_available and
    # unavailable blocks rank last), so scattering "rank < take" back through `order` marks them.
    taken_ranks = torch.arange(nk, device=ahat.device) < take.unsqueeze(-1)
    chosen = torch.zeros_like(order, dtype=torch.bool).scatter_(-1, order, taken_ranks)
    selected = forced | chosen
    kv_num_blocks, kv_indices = block_mask_to_indices(selected)
    return BlockSelection(
        kv_num_blocks=kv_num_blocks,
        kv_indices=kv_indices,
        lazy=lazy,
        budget=take,
        block_size=params.block_size,
        q_len=q_len,
        kv_len=kv_len,
    )
