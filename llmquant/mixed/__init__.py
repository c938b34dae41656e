"""Mixed precision: each layer's scheme chosen under a budget the user states.

``QuantConfig(method="gptq", target_bpw=3.5)`` (or ``max_size=...`` bytes for the whole checkpoint, or ``max_latency=...`` milliseconds per token in
the quantized layers, from a timing table of this machine: :mod:`llmquant.mixed.latency`)
makes :func:`llmquant.quantize` first *measure* every planned layer at every candidate scheme
(:mod:`llmquant.mixed.measure`), then *allocate* one scheme per fused group of layers with the least
predicted damage that fits the budget (:mod:`llmquant.mixed.allocate`), then quantize with those
schemes written as the config's per-module ``overrides``. The checkpoint is an ordinary llmquant
checkpoint: its config names every layer's scheme, and its ``mixed`` field records the budget, the bits
per weight reached and the predicted damage.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from llmquant.config import QuantConfig, match_pattern
from llmquant.mixed.allocate import Allocation, BudgetError, allocate, total_weights
from llmquant.mixed.cost import candidates, layer_bytes, scheme_key
from llmquant.mixed.measure import Measurement, MeasurementError, measure, stored_bytes, table_target
from llmquant.quantizers import quantize_model as quantize_planned
from llmquant.quantizers.plan import check_tied_head
from llmquant.registry import get_method

logger = logging.getLogger(__name__)

__all__ = [
    "Allocation", "BudgetError", "Measurement", "MeasurementError", "allocate", "candidates", "layer_bytes",
    "measure", "plan_mixed", "quantize_model", "scheme_key",
]


def _fixed_groups(meas: Measurement, config: QuantConfig) -> dict[str, str]:
    """Groups whose scheme a user override already gives (every member must agree)."""
    fixed: dict[str, str] = {}
    for g in meas.groups:
        keys = set()
        for name in g.layers:
            for pattern, ov in config.overrides.items():
                if match_pattern(pattern, name):
                    keys.add(scheme_key(config.resolve(name)))
                    break
        if len(keys) > 1:
            raise ValueError(f"overrides give the fused layers {g.layers} different schemes {sorted(keys)}; "
                             "they share one input and are served as one layer: give them one scheme")
        if keys:
            fixed[g.name] = keys.pop()
    return fixed


def budget_bytes(config: QuantConfig, weights: int, other_bytes: int) -> tuple[int, str]:
    """The bytes the planned layers (``weights`` weights) may take under a target_bpw or max_size budget,
    and how the budget reads to a user; ``other_bytes``: what the checkpoint holds outside them."""
    if config.target_bpw is not None:
        return int(config.target_bpw * weights // 8), f"target of {config.target_bpw} bpw"
    room = config.max_size - other_bytes
    if room <= 0:
        raise BudgetError(
            f"max_size {config.max_size} bytes leaves nothing for the quantized layers: the rest of the checkpoint "
            f"(embeddings, norms, float layers) already takes {other_bytes} bytes"
        )
    return room, f"max_size of {config.max_size} bytes ({other_bytes} outside the quantized layers)"


def _check_budget_early(model: nn.Module, config: QuantConfig, schemes, table: dict | None) -> None:
    """Refuse a budget outside what any allocation can take before the (long) measurement pass. Layer
    by layer, so a necessary condition; the allocation checks the exact bounds of fused groups."""
    from llmquant.checkpoint import storage_dtype
    from llmquant.mixed.allocate import check_budget, describe_bytes, describe_us
    from llmquant.mixed.measure import other_bytes
    from llmquant.modules.walk import linear_weight
    from llmquant.quantizers.plan import check_plan

    todo = check_plan(model, config)
    shapes = [tuple(linear_weight(m).shape) for _, m, _ in todo]
    keys = [scheme_key(s) for s in schemes]
    if table is not None:
        from llmquant.mixed.latency import check_table, shape_key

        check_table(table, shapes, keys, perm=config.stores_perm)
        costs = [[table["entries"][shape_key(n, k)][key] for key in keys] for n, k in shapes]
        check_budget(config.max_latency * 1000, sum(map(min, costs)), sum(map(max, costs)), describe_us,
                     f"max_latency of {config.max_latency} ms")
        return
    by_key = dict(zip(keys, schemes))
    costs = [list(stored_bytes(config, name, n, k, by_key).values()) for (name, _, _), (n, k) in zip(todo, shapes)]
    weights = sum(n * k for n, k in shapes)
    target = table_target(model, config)
    if target is not None:  # the embedding table is allocated too (stored once, no perm)
        v, d = target[1].weight.shape
        costs.append(list(stored_bytes(config, target[0], v, d, by_key, table=True).values()))
        weights += v * d
    lo, hi = sum(map(min, costs)), sum(map(max, costs))
    other = 0 if config.max_size is None else other_bytes(model, config, {name for name, _, _ in todo}, storage_dtype(model))
    budget, what = budget_bytes(config, weights, other)
    check_budget(budget, lo, hi, describe_bytes(weights), what)


def plan_mixed(
    model: nn.Module,
    config: QuantConfig,
    calibration: Iterable[torch.Tensor],
    progress: bool = True,
    measurement: str | Path | Measurement | None = None,
    timing_table: str | Path | None = None,
) -> tuple[QuantConfig, dict]:
    """Measure (or reuse ``measurement``: a :class:`Measurement` or a JSON file, written there when it does
    not exist yet) and allocate (a latency budget reads ``timing_table``, :mod:`llmquant.mixed.latency`); returns the config with every planned layer's scheme as an override and
    the budget fields cleared, and a summary dict (``allocation``, ``measurement`` seconds)."""
    if not config.budgeted:
        raise ValueError("plan_mixed needs a config with a budget (target_bpw or max_size)")
    schemes = candidates(config.mixed_bits, config.mixed_group_sizes)
    keys = [scheme_key(s) for s in schemes]
    table = None
    if config.max_latency is not None:  # a missing or foreign table fails before the measurement pass
        from llmquant.mixed.latency import check_table, load_table, shape_key

        table = load_table(timing_table)
        check_table(table, [], keys, perm=config.stores_perm)
    _check_budget_early(model, config, schemes, table)
    t0 = time.perf_counter()
    path = None
    if isinstance(measurement, Measurement):
        meas = measurement
        meas.check(model, config, keys)
    elif measurement is not None and Path(measurement).exists():
        path = Path(measurement)
        meas = Measurement.load(path)
        meas.check(model, config, keys)
        logger.info("mixed precision: reusing the measurement %s", path)
    else:
        if calibration is None:
            raise ValueError("mixed precision measures every layer on calibration data: pass calibration=...")
        meas = measure(model, config, calibration, schemes, progress=progress)
        if measurement is not None:
            meas.save(measurement)
            logger.info("mixed precision: measurement written to %s", measurement)
    if path is not None or isinstance(measurement, Measurement):
        changed = meas.reprice(model, config)
        if changed:
            logger.info("mixed precision: %d layers of the measurement repriced at the bytes this llmquant stores", changed)
    t_measure = time.perf_counter() - t0
    t0 = time.perf_counter()
    if table is not None:
        check_table(table, [(lay.n, lay.k) for lay in meas.layers], keys, perm=config.stores_perm)
        entries = table["entries"]
        alloc = allocate(meas, config.max_latency * 1000, keys, _fixed_groups(meas, config),
                         budget_name=f"max_latency of {config.max_latency} ms", unit="us",
                         layer_cost=lambda lay, key: entries[shape_key(lay.n, lay.k)][key])
    else:
        budget, what = budget_bytes(config, total_weights(meas), meas.other_bytes)
        alloc = allocate(meas, budget, keys, _fixed_groups(meas, config), budget_name=what)
    t_alloc = time.perf_counter() - t0
    overrides = dict(config.overrides)
    for name, s in alloc.layers.items():
        overrides.setdefault(name, {"bits": s.bits, "group_size": s.group_size, "sym": s.sym})
    table = table_target(model, config)
    if table is not None and table[2]:  # the output layer keeps sharing the table: the same scheme
        s = alloc.layers[table[0]]  # first, so that no broader pattern of the user's wins for the head
        overrides = {"lm_head": {"bits": s.bits, "group_size": s.group_size, "sym": s.sym}, **overrides}
    record = {
        "target_bpw": config.target_bpw,
        "max_size": config.max_size,
        "max_latency": config.max_latency,
        "predicted_ms": alloc.cost / 1000 if alloc.unit == "us" else None,
        "bpw": round(alloc.bpw, 6),
        "layer_bytes": alloc.bytes,
        "predicted_kl": alloc.predicted_kl,
        "candidates": keys,
        "measurement": meas.fingerprint[:16],
    }
    effective = config.replace(overrides=overrides, target_bpw=None, max_size=None, max_latency=None, mixed=record)
    s = alloc.summary()
    logger.info("mixed precision: %.3f bpw over %d layers (%s), predicted KL %.4g (lower bound %.4g)",
                alloc.bpw, len(alloc.layers), s["layers_by_bits"], alloc.predicted_kl, alloc.lower_bound)
    return effective, {"allocation": s, "seconds": {"measure": t_measure, "allocate": t_alloc},
                       "measurement_seconds": meas.seconds}


def quantize_model(
    model: nn.Module,
    config: QuantConfig,
    calibration: Iterable[torch.Tensor] | None = None,
    progress: bool = True,
    measurement: str | Path | Measurement | None = None,
    timing_table: str | Path | None = None,
) -> tuple[dict, QuantConfig]:
    """:func:`llmquant.quantizers.quantize_model`, with a budget allocated first when ``config`` has one
    (then ``summary["mixed"]`` holds the allocation and ``summary["seconds"]`` includes it)."""
    if not config.budgeted:
        return quantize_planned(model, config, calibration, progress)  # it checks the tied head itself
    check_tied_head(model, config)  # before the measurement pass
    if calibration is None:
        raise ValueError(
            "a budget (target_bpw/max_size) chooses each layer's scheme by measuring it on calibration data: "
            "pass calibration=... (token id batches, see llmquant.calibration.calibration_batches)"
        )
    get_method(config.method).check_model(model, config)  # before the measurement pass
    calibration = list(calibration)  # read twice: measurement, then the method
    effective, mixed = plan_mixed(model, config, calibration, progress=progress, measurement=measurement,
                                  timing_table=timing_table)
    summary, effective = quantize_planned(model, effective, calibration, progress)
    summary["mixed"] = mixed
    summary["seconds"] += sum(mixed["seconds"].values())
    return summary, effective
