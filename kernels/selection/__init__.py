"""KV-block selection: lazy/active query blocks and the head-level shared budget."""

from .block_selection import BlockSelection
from .params import SelectionCall, SelectionParams
from .reference import forced_pattern, select_blocks

__all__ = ["BlockSelection", "SelectionCall", "SelectionParams", "forced_pattern", "select_blocks"]
