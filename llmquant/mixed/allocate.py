"""Allocation: one scheme per fused group that minimizes the predicted damage under a budget (bytes,
or predicted decode time of the quantized layers).

This is a multiple-choice knapsack: groups g = 1..G, each picks one scheme c with cost ``b[g, c]``
(stored bytes) and damage ``d[g, c]`` (predicted KL, :mod:`llmquant.mixed.measure`); minimize
``sum d`` subject to ``sum b <= B``. It is solved exactly by dynamic programming over the budget
cut into ``resolution`` units, every cost rounded *up* to whole units, so the answer always fits
the real budget; it is optimal among allocations that fit ``B - G * unit``. The Lagrangian dual
``max_l sum_g min_c (d + l b) - l B`` gives a lower bound on the true optimum, reported beside the
answer (``gap``): how far from optimal the answer can be, in the same units as the damage. Bytes the
rounding leaves unspent go to single-group improvements afterwards, so the answer is never worse than
the optimum for ``B - G * unit`` and never better than the optimum for ``B``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from llmquant.config import LayerQuant
from llmquant.mixed.cost import parse_scheme_key, scheme_key
from llmquant.mixed.measure import LayerMeasure, Measurement

#: budget units of the dynamic programme
RESOLUTION = 20000


class BudgetError(ValueError):
    """The budget cannot be met (or is above what any allocation needs)."""


@dataclass
class Allocation:
    #: group name -> scheme key
    choice: dict[str, str]
    #: layer name -> scheme
    layers: dict[str, LayerQuant]
    bytes: int
    weights: int
    predicted_kl: float
    lower_bound: float
    #: the budget, in the unit of the allocated cost (bytes; microseconds for a latency budget)
    budget: float
    #: what the chosen schemes cost in that unit
    cost: float
    unit: str = "bytes"

    @property
    def bpw(self) -> float:
        return 8 * self.bytes / self.weights

    def summary(self) -> dict:
        counts: dict[str, int] = {}
        for s in self.layers.values():
            key = f"{s.bits}-bit"
            counts[key] = counts.get(key, 0) + 1
        out = {"bpw": self.bpw, "bytes": self.bytes, "budget": self.budget, "cost": self.cost, "unit": self.unit}
        if self.unit == "us":
            out["predicted_ms"] = self.cost / 1000
        return {**out, "predicted_kl": self.predicted_kl, "lower_bound_kl": self.lower_bound,
                "gap_kl": self.predicted_kl - self.lower_bound, "layers_by_bits": dict(sorted(counts.items())),
                "groups": dict(self.choice)}


#: what one layer costs at one scheme, in the unit of the budget (default: its stored bytes)
LayerCost = Callable[[LayerMeasure, str], float]


def total_weights(meas: Measurement) -> int:
    return sum(lay.n * lay.k for lay in meas.layers)


def _tables(meas: Measurement, keys: list[str], fixed: dict[str, str], layer_cost: LayerCost | None = None):
    layer_cost = layer_cost or (lambda lay, key: lay.bytes[key])
    names, cost, dmg = [], [], []
    for g in meas.groups:
        allowed = [fixed[g.name]] if g.name in fixed else keys
        c = np.full(len(keys), np.inf)
        d = np.full(len(keys), np.inf)
        for key in allowed:
            i = keys.index(key)
            c[i] = sum(layer_cost(meas.layer(n), key) for n in g.layers)
            d[i] = meas.damage(g, key)
        names.append(g.name)
        cost.append(c)
        dmg.append(d)
    return names, np.array(cost), np.array(dmg)


def bounds(meas: Measurement, keys: list[str], fixed: dict[str, str] | None = None,
           layer_cost: LayerCost | None = None) -> tuple[float, float]:
    """(smallest, largest) cost (default: bytes) any allocation over ``keys`` can take."""
    _, cost, _ = _tables(meas, keys, fixed or {}, layer_cost)
    finite = np.where(np.isfinite(cost), cost, np.nan)
    return float(np.nanmin(finite, axis=1).sum()), float(np.nanmax(finite, axis=1).sum())


def describe_bytes(weights: int) -> Callable[[float], str]:
    return lambda b: f"{int(b)} bytes = {8 * b / weights:.3f} bpw"


def describe_us(c: float) -> str:
    return f"{c / 1000:.4f} ms"


def check_budget(budget: float, lo: float, hi: float, describe: Callable[[float], str], budget_name: str) -> None:
    """:class:`BudgetError` unless ``lo <= budget <= hi``, with all three numbers."""
    if budget < lo:
        raise BudgetError(
            f"the {budget_name} ({describe(budget)}) is below the smallest allocation of the candidate schemes: {describe(lo)}"
        )
    if budget > hi:
        raise BudgetError(
            f"the {budget_name} ({describe(budget)}) is above the largest allocation of the candidate schemes: "
            f"{describe(hi)}; quantize uniformly with the largest scheme instead"
        )


def _lagrangian_bound(cost: np.ndarray, dmg: np.ndarray, budget: float) -> float:
    """max over l >= 0 of sum_g min_c (d + l c) - l B (a concave function of l): a lower bound."""
    ok = np.isfinite(cost)
    c0, d0 = np.where(ok, cost, 0.0), np.where(ok, dmg, 0.0)

    def dual(lam: float) -> float:
        return float(np.min(np.where(ok, d0 + lam * c0, np.inf), axis=1).sum() - lam * budget)

    lo, hi = 0.0, 1.0
    while dual(hi) > dual(hi / 2) and hi < 1e30:
        hi *= 2
    # golden-section search on a concave function
    phi = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    for _ in range(200):
        c1 = b - phi * (b - a)
        c2 = a + phi * (b - a)
        if dual(c1) < dual(c2):
            a = c1
        else:
            b = c2
    return max(dual(0.0), dual((a + b) / 2))


def _use_slack(choice: list[int], cost: np.ndarray, dmg: np.ndarray, budget: int) -> None:
    """Spend the bytes the rounding left over: while some single group can move to a scheme of less
    damage that still fits the exact budget, make the move that gains most (never worse)."""
    while True:
        spent = sum(cost[gi, ci] for gi, ci in enumerate(choice))
        best = (0.0, None, None)
        for gi, ci in enumerate(choice):
            fits = np.isfinite(cost[gi]) & (cost[gi] - cost[gi, ci] + spent <= budget)
            gain = np.where(fits, dmg[gi, ci] - dmg[gi], 0.0)
            cj = int(np.argmax(gain))
            if gain[cj] > best[0]:
                best = (float(gain[cj]), gi, cj)
        if best[1] is None:
            return
        choice[best[1]] = best[2]


def allocate(
    meas: Measurement,
    budget: float,
    keys: list[str],
    fixed: dict[str, str] | None = None,
    resolution: int = RESOLUTION,
    budget_name: str = "budget",
    layer_cost: LayerCost | None = None,
    unit: str = "bytes",
) -> Allocation:
    """The allocation of least predicted damage whose planned layers cost at most ``budget``.

    ``keys``: the candidate schemes; ``fixed``: groups whose scheme is given (per-module overrides);
    ``layer_cost``: the cost of a layer at a scheme in ``unit`` (default: its stored bytes).
    Raises :class:`BudgetError` when the budget is below the smallest or above the largest allocation.
    """
    fixed = fixed or {}
    names, cost, dmg = _tables(meas, keys, fixed, layer_cost)
    describe = describe_bytes(total_weights(meas)) if layer_cost is None else (
        describe_us if unit == "us" else (lambda c: f"{c:g} {unit}"))
    lo, hi = bounds(meas, keys, fixed, layer_cost)
    check_budget(budget, lo, hi, describe, budget_name)
    unit_size = budget / resolution
    units = np.where(np.isfinite(cost), np.ceil(cost / unit_size - 1e-9), np.inf)
    cap = resolution
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    picks = np.zeros((len(names), cap + 1), dtype=np.int16)
    for gi in range(len(names)):
        new = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, dtype=np.int16)
        for ci in range(cost.shape[1]):
            u = units[gi, ci]
            if not np.isfinite(u) or u > cap:
                continue
            u = int(u)
            cand = np.full(cap + 1, np.inf)
            cand[u:] = best[: cap + 1 - u] + dmg[gi, ci]
            better = cand < new
            new[better] = cand[better]
            arg[better] = ci
        best = new
        picks[gi] = arg
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        # the rounding up of costs made a budget just above the minimum infeasible: take the smallest
        choice_idx = [int(np.nanargmin(np.where(np.isfinite(cost[gi]), cost[gi], np.nan))) for gi in range(len(names))]
    else:
        choice_idx = []
        b = end
        for gi in range(len(names) - 1, -1, -1):
            ci = int(picks[gi, b])
            choice_idx.append(ci)
            b -= int(units[gi, ci])
        choice_idx.reverse()
    _use_slack(choice_idx, cost, dmg, budget)
    choice = {names[gi]: keys[ci] for gi, ci in enumerate(choice_idx)}
    spent = float(sum(cost[gi, ci] for gi, ci in enumerate(choice_idx)))
    layers = {}
    for g in meas.groups:
        for n in g.layers:
            layers[n] = parse_scheme_key(choice[g.name])
    nbytes = sum(meas.layer(n).bytes[scheme_key(s)] for n, s in layers.items())
    predicted = float(sum(dmg[gi, ci] for gi, ci in enumerate(choice_idx)))
    return Allocation(choice, layers, nbytes, total_weights(meas), predicted, _lagrangian_bound(cost, dmg, budget),
                      budget, spent, unit)
