"""Decode attention over a slim (ragged) KV cache: `SlimKV` and its reference `slim_decode`."""

from .reference import slim_decode
from .slim_kv import SlimKV

__all__ = ["SlimKV", "slim_decode"]
