"""The abstract values of the mask analysis: tensors known as functions of their own coordinates.

A tensor of n dims is described over its coordinates x = (x_0, ..., x_{n-1}):

- `Affine` (integer tensor): ``const + sum_i coefs[i] * x_i`` (``arange``, positions, offsets);
- `Pred` (bool tensor): True where ``sum_i form[i] * x_i`` lies in an `IntSet` (a comparison of
  affine values, and ``&``, ``|``, ``~`` of predicates over the same form); a constant predicate
  has the zero form and the empty or the full set;
- `FloatConst` (float tensor): one value everywhere;
- `Additive` (float tensor): 0 where ``keep`` holds and ``low`` elsewhere (``torch.where(keep, 0,
  finfo.min)``), ``low`` at most half the dtype's lowest value or ``-inf``, so its softmax weight
  underflows to exactly 0.

A coefficient on a dim of size 1 is always 0 (that coordinate is 0), so broadcasting needs no
care: shapes are aligned from the right and missing dims get coefficient 0. (A symbolic size is
never 1: Dynamo specialises sizes 0 and 1.) Every operation is
exact; what cannot be expressed is ``None`` (unknown) in the interpreter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

INF = math.inf
Interval = tuple[float, float]  # inclusive integer bounds; -INF / INF for unbounded


@dataclass(frozen=True)
class IntSet:
    """A set of integers as sorted, disjoint, non-adjacent inclusive intervals."""

    intervals: tuple[Interval, ...]

    @staticmethod
    def of(*intervals: Interval) -> IntSet:
        merged: list[Interval] = []
        for lo, hi in sorted(i for i in intervals if i[0] <= i[1] and i[0] < INF and i[1] > -INF):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        return IntSet(tuple(merged))

    def __and__(self, other: IntSet) -> IntSet:
        return IntSet.of(*(
            (max(a, c), min(b, d)) for a, b in self.intervals for c, d in other.intervals
        ))  # fmt: skip

    def __or__(self, other: IntSet) -> IntSet:
        return IntSet.of(*self.intervals, *other.intervals)

    def __invert__(self) -> IntSet:
        bounds = [-INF, *(v for lo, hi in self.intervals for v in (lo - 1, hi + 1)), INF]
        return IntSet.of(*zip(bounds[::2], bounds[1::2]))

    def shifted(self, offset: int) -> IntSet:
        """{v + offset : v in self}."""
        return IntSet(tuple((lo + offset, hi + offset) for lo, hi in self.intervals))

    def divided(self, m: int) -> IntSet:
        """{y : m * y in self} for m != 0."""
        if m < 0:
            return IntSet.of(*((-hi, -lo) for lo, hi in self.divided(-m).intervals))
        return IntSet.of(*((_ceil_div(lo, m), _floor_div(hi, m)) for lo, hi in self.intervals))


def _floor_div(a: float, m: int) -> float:
    return a if math.isinf(a) else a // m


def _ceil_div(a: float, m: int) -> float:
    return a if math.isinf(a) else -((-a) // m)


EMPTY = IntSet(())
ALL = IntSet(((-INF, INF),))


def _zeroed(coefs: tuple[int, ...], shape: tuple) -> tuple[int, ...]:
    return tuple(0 if isinstance(size, int) and size == 1 else c for c, size in zip(coefs, shape))


def aligned(coefs: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """``coefs`` of a tensor broadcast to ``ndim`` dims (aligned from the right)."""
    return (0,) * (ndim - len(coefs)) + coefs


@dataclass(frozen=True)
class Affine:
    """int tensor: ``const + sum(coefs[i] * x_i)``."""

    coefs: tuple[int, ...]
    const: int

    @staticmethod
    def of(coefs: tuple[int, ...], const: int, shape: tuple) -> Affine:
        """The affine value of a tensor of ``shape`` (coefficients on its size-1 dims dropped)."""
        return Affine(_zeroed(coefs, shape), const)

    def plus(self, other: Affine, sign: int = 1) -> Affine:
        n = max(len(self.coefs), len(other.coefs))
        pairs = zip(aligned(self.coefs, n), aligned(other.coefs, n))
        return Affine(tuple(a + sign * b for a, b in pairs), self.const + sign * other.const)

    def times(self, factor: int) -> Affine:
        return Affine(tuple(factor * c for c in self.coefs), factor * self.const)


Comparison = Literal["le", "lt", "ge", "gt", "eq", "ne"]


@dataclass(frozen=True)
class Pred:
    """bool tensor: True where ``sum(form[i] * x_i)`` is in ``values``; ``form`` has gcd 1 and its
    first nonzero entry positive, or is all zero (a constant: ``values`` EMPTY or ALL)."""

    form: tuple[int, ...]
    values: IntSet

    @staticmethod
    def constant(value: bool, ndim: int = 0) -> Pred:
        return Pred((0,) * ndim, ALL if value else EMPTY)

    @staticmethod
    def of(form: tuple[int, ...], values: IntSet, shape: tuple) -> Pred:
        """True where ``sum(form[i] * x_i)`` is in ``values``, on a tensor of ``shape``, normalised."""
        form = _zeroed(form, shape)
        g = math.gcd(*form)
        if g == 0:
            return Pred.constant(values & IntSet.of((0, 0)) != EMPTY, len(form))
        m = g if next(c for c in form if c) > 0 else -g
        return Pred(tuple(c // m for c in form), values.divided(m))

    @staticmethod
    def compare(diff: Affine, op: Comparison, shape: tuple) -> Pred:
        """The predicate ``diff <op> 0`` on a tensor of ``shape``."""
        k = diff.const
        raw = {"le": IntSet.of((-INF, -k)), "lt": IntSet.of((-INF, -k - 1)),
               "ge": IntSet.of((-k, INF)), "gt": IntSet.of((-k + 1, INF)),
               "eq": IntSet.of((-k, -k)), "ne": ~IntSet.of((-k, -k))}[op]  # fmt: skip
        return Pred.of(diff.coefs, raw, shape)

    def is_constant(self) -> bool:
        return not any(self.form)

    def __invert__(self) -> Pred:
        return Pred(self.form, ~self.values)

    def combine(self, other: Pred, op: Literal["and", "or"]) -> Pred | None:
        """``self & other`` or ``self | other``; None when their forms differ (not expressible)."""
        n = max(len(self.form), len(other.form))
        a, b = Pred(aligned(self.form, n), self.values), Pred(aligned(other.form, n), other.values)
        if a.is_constant() and not b.is_constant():
            a, b = b, a
        if b.is_constant():
            absorbing = b.values == (EMPTY if op == "and" else ALL)
            return Pred((0,) * n, b.values) if absorbing else a
        if a.form != b.form:
            return None
        return Pred(a.form, a.values & b.values if op == "and" else a.values | b.values)


@dataclass(frozen=True)
class FloatConst:
    """float tensor holding ``value`` everywhere."""

    value: float


@dataclass(frozen=True)
class Additive:
    """float tensor: 0 where ``keep`` holds, ``low`` (softmax weight exactly 0) elsewhere."""

    keep: Pred
    low: float


Value = Affine | Pred | FloatConst | Additive


def negligible(low: float, dtype: torch.dtype) -> bool:
    """Whether an additive mask value ``low`` in ``dtype`` masks its entry (as `causal_if_equivalent`)."""
    return dtype.is_floating_point and low <= torch.finfo(dtype).min / 2


MaskProof = Literal["causal", "window", "all", "other"]


def classify(value: Value | None, q_len: object, kv_len: object) -> tuple[MaskProof, int | None] | None:
    """What a mask broadcast to [..., q_len, kv_len] is: ``("causal", None)``, ``("window", W)``
    (query row r sees key c iff r - W < c <= r), ``("all", None)`` (keeps everything), ``("other",
    None)`` (proven a function of positions, none of those), or None (unknown).

    With int sizes only the rows and columns that exist count: a window of at least ``q_len`` is causal.
    """
    pred = value.keep if isinstance(value, Additive) else value
    if not isinstance(pred, Pred):
        return None
    form = aligned(pred.form, 2)
    if any(form[:-2]):
        return "other", None  # varies over batch or heads
    if pred.is_constant():
        return ("all" if pred.values == ALL else "other"), None
    if form[-2:] != (1, -1):  # y = r - c, as the normalisation writes it
        return "other", None
    static = isinstance(q_len, int) and isinstance(kv_len, int)
    grid = IntSet.of((-(kv_len - 1), q_len - 1)) if static else ALL  # the values of r - c that occur
    kept = pred.values & grid
    if kept == grid:
        return "all", None
    if kept == IntSet.of((0, INF)) & grid:
        return "causal", None
    for lo, hi in kept.intervals if len(kept.intervals) == 1 else ():
        if lo == 0 and hi < INF:
            return "window", int(hi) + 1
    return "other", None
