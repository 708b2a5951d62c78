"""`PerForward`: a function memoised on its last call, for what every layer of one forward derives from
the same tensors.

transformers hands every attention layer of one forward the same mask and position-id tensors; what is
read from them (a padding check, packed-sequence bounds, with their host syncs) is then computed once
per forward instead of once per layer.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

from torch import Tensor

_R = TypeVar("_R")


class PerForward(Generic[_R]):
    """``fn`` memoised on its last call, keyed by the identity and version of its tensor arguments (an
    in-place write changes the version) and the value of the others."""

    def __init__(self, fn: Callable[..., _R]):
        functools.update_wrapper(self, fn)
        self.fn, self.key, self.refs, self.value = fn, None, [], None

    def __call__(self, *args: object) -> _R:
        key = tuple((id(a), a._version) if isinstance(a, Tensor) else a for a in args)
        if key != self.key or any(ref() is None for ref in self.refs):  # a dead tensor's id can be reused
            self.value = self.fn(*args)
            self.key, self.refs = key, [weakref.ref(a) for a in args if isinstance(a, Tensor)]
        return self.value
