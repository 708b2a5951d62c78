"""KV-block selection: lazy/active query blocks and the head-level shared budget."""

from .block_selection import BlockSelection
from .select import forced_pattern, select_blocks

__all__ = ["BlockSelection", "forced_pattern", "select_blocks"]
