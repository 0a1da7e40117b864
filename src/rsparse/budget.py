"""Byte budgets: how much of each projection's weight is read per decoded token.

All counts are in weight elements (bytes / element size; every stored tensor shares the model
dtype). A projection W (out x in) that keeps a fraction kappa of its input channels and carries
rank-r factors reads, per token,
    bytes(kappa, r) = kappa * in * out + r * (in + out)
(a kept channel is one column of W; the factors U (out x r) and A (r x in) are read whole).
Model-level sparsity is 1 - sum(bytes) / sum(in * out) over all seven projections of all blocks,
with each projection's true shape, so grouped-query k/v (fewer outputs) weigh less than q.

A layer with target sparsity s and split alpha has budget B = (1 - s) * in * out: a share alpha
goes to kept channels, the rest to rank, r = floor((1 - alpha) * B / (in + out)) (rounded down to a
multiple m where the backend stores ranks in multiples: the Triton modules pad to 16). What the floor
leaves over goes back to kept channels, so the budget is met exactly and never exceeded.

`RankRule` is what an allocation that chooses ranks itself may use: the ranks allowed (at most
`max_rank`, multiples of `multiple`) and what a rank costs in the budget, `cost` * r * (in + out).
cost = 1 is the method's byte accounting. cost > 1 charges factor bytes as that many kept-column
bytes: on the H200 a factor byte takes several times the decode time of a kept-column byte (fixed
work per ranked call, the U product after the gather; docs/perf-gpu.md session 29), so a plan meant
for GPU speed should buy rank only where it beats that price. The bytes actually read then stay at or
under the budget (cost >= 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import RSparseError


def _number(v, what: str) -> float:
    if isinstance(v, (bool, str)):  # float("0.5") would pass a string through a config unnoticed
        raise RSparseError(f"{what} must be a number, got {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise RSparseError(f"{what} must be a number, got {v!r}") from None


def check_whole(v, what: str, least: int = 1) -> int:
    """`v` as a whole number of at least `least` (a bool or 2.5 is refused, not truncated)."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < least:
        raise RSparseError(f"{what} must be a whole number >= {least}, got {v!r}")
    return int(v)


def check_range(v, what: str, lo: float, hi: float) -> float:
    """`v` as a finite float in [lo, hi] (nan and inf refused; hi may be inf)."""
    v = _number(v, what)
    if not (lo <= v <= hi and math.isfinite(v)):  # also false for nan
        raise RSparseError(f"{what} must be a finite number in [{lo:g}, {hi:g}], got {v}")
    return v


def check_sparsity(s: float, what: str = "sparsity") -> float:
    s = _number(s, what)
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise RSparseError(f"{what} must be in [0, 1), got {s}")
    return s


def check_alpha(a: float) -> float:
    a = _number(a, "alpha")
    if not (0.0 <= a <= 1.0) or math.isnan(a):
        raise RSparseError(f"alpha must be in [0, 1], got {a}")
    return a


@dataclass(frozen=True)
class Allocation:
    keep: float  # expected fraction of input channels kept (kappa)
    rank: int

    def elements(self, out_f: int, in_f: int) -> float:
        return self.keep * in_f * out_f + self.rank * (in_f + out_f)


def allocate(out_f: int, in_f: int, sparsity: float, alpha: float, multiple: int = 1) -> Allocation:
    """(kappa, r) for a layer of shape (out, in) at byte sparsity `sparsity` and split `alpha`, r a
    multiple of `multiple`."""
    check_sparsity(sparsity)
    check_alpha(alpha)
    budget = (1.0 - sparsity) * in_f * out_f
    rank = min(int(math.floor((1.0 - alpha) * budget / (in_f + out_f) + 1e-9)), min(in_f, out_f))
    rank -= rank % multiple
    keep = (budget - rank * (in_f + out_f)) / (in_f * out_f)
    return Allocation(keep=min(1.0, max(0.0, keep)), rank=rank)


def model_sparsity(allocs: dict, shapes: dict) -> float:
    """1 - bytes read / dense bytes, over the projections in `shapes` ({key: (out, in)});
    projections absent from `allocs` count as dense."""
    dense = sum(o * i for o, i in shapes.values())
    read = sum(allocs[k].elements(o, i) if k in allocs else o * i for k, (o, i) in shapes.items())
    return 1.0 - read / dense


@dataclass(frozen=True)
class RankRule:
    """Ranks an allocation may choose and their price in the budget (see the module docstring)."""
    max_rank: int | None = None
    multiple: int = 1
    cost: float = 1.0

    def __post_init__(self):
        check_rank_rule(self.multiple, self.cost)

    def allowed(self, ranks) -> list:
        """Indices into `ranks` of the ranks this rule allows (0 always is)."""
        return [j for j, r in enumerate(ranks) if r == 0 or ((self.max_rank is None or r <= self.max_rank) and r % self.multiple == 0)]

    def elements(self, rank: int, out_f: int, in_f: int) -> float:
        """What rank-r factors of an (out, in) layer cost in the budget, in weight elements."""
        return self.cost * rank * (in_f + out_f)


def check_rank_rule(multiple, cost) -> tuple[int, float]:
    """(multiple, cost) as plain int and float, or a clear refusal."""
    multiple = check_whole(multiple, "rank_multiple")
    c = None if isinstance(cost, (bool, str)) else cost
    try:
        c = float(c)
    except (TypeError, ValueError):
        c = math.nan
    if not 1.0 <= c < math.inf:
        raise RSparseError(f"rank_cost must be a finite number >= 1 (a factor byte never costs less than a kept "
                           f"column's: the plan would read more than its budget), got {cost!r}")
    return multiple, c
