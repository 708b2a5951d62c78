"""KV-block selection: lazy/active query blocks and the head-level shared budget."""

from .block_selection import BlockSelection

__all__ = ["BlockSelection"]
