"""`SelectionParams`: what the KV selection reads of the config (METHOD.md sections 2-3), built by
``omnicompile.method.selection_params``; `SelectionCall`: what it reads of the attention call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

BudgetScope = Literal["heads", "kv_group", "head"]


@dataclass(frozen=True)
class SelectionParams:
    """Parameters of the selection stage (`reference.select_blocks` for the rule).

    Attributes:
        block_size: query and key block size b.
        tau: recall target of the KV selection, in (0, 1].
        n_sink, n_local: forced sink blocks and local-window blocks.
        query_selection: lazy/active classification of query blocks on or off.
        lazy_threshold: local mass at which a query block is lazy.
        min_blocks, max_blocks: clamp of the shared budget K (``None`` = no upper clamp).
        budget_scope: who shares K: ``"heads"``, ``"kv_group"`` or ``"head"``.
        dense_last_blocks: the last query blocks that take every allowed key block.
        dense_fallback_density: a (batch, head) denser than this takes every allowed block (1.0: never).
    """

    block_size: int
    tau: float
    n_sink: int
    n_local: int
    query_selection: bool
    lazy_threshold: float
    min_blocks: int
    max_blocks: int | None
    budget_scope: BudgetScope
    dense_last_blocks: int
    dense_fallback_density: float


class SelectionCall(NamedTuple):
    """The attention call a selection is made for.

    Attributes:
        num_kv_heads: Hkv; ``"kv_group"`` shares the budget among the H // Hkv heads of a KV head.
        is_causal: picks the local window (ending at i, or centred on i; `reference.forced_pattern`).
        q_len, kv_len: Sq and Skv, recorded in the selection.
    """

    num_kv_heads: int
    is_causal: bool
    q_len: int
    kv_len: int
