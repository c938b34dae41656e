"""Mixed precision: each layer's scheme chosen under a budget the user states.

``QuantConfig(method="gptq", target_bpw=3.5)`` (or ``max_size=...`` bytes for the whole checkpoint)
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
from llmquant.mixed.cost import candidates, layer_bytes, parse_scheme_key, scheme_key
from llmquant.mixed.measure import Measurement, MeasurementError, measure

logger = logging.getLogger(__name__)

__all__ = [
    "Allocation", "BudgetError", "Measurement", "MeasurementError", "allocate", "candidates", "layer_bytes",
    "measure", "plan_mixed", "scheme_key",
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


def budget_bytes(meas: Measurement, config: QuantConfig) -> tuple[int, str]:
    """The bytes the planned layers may take, and how the budget reads to a user."""
    if config.target_bpw is not None:
        return int(config.target_bpw * total_weights(meas) // 8), f"target of {config.target_bpw} bpw"
    room = config.max_size - meas.other_bytes
    if room <= 0:
        raise BudgetError(
            f"max_size {config.max_size} bytes leaves nothing for the quantized layers: the rest of the checkpoint "
            f"(embeddings, norms, float layers) already takes {meas.other_bytes} bytes"
        )
    return room, f"max_size of {config.max_size} bytes ({meas.other_bytes} outside the quantized layers)"


def plan_mixed(
    model: nn.Module,
    config: QuantConfig,
    calibration: Iterable[torch.Tensor],
    progress: bool = True,
    measurement: str | Path | Measurement | None = None,
) -> tuple[QuantConfig, dict]:
    """Measure (or reuse ``measurement``: a :class:`Measurement` or a JSON file, written there when it does
    not exist yet) and allocate; returns the config with every planned layer's scheme as an override and
    the budget fields cleared, and a summary dict (``allocation``, ``measurement`` seconds)."""
    if not config.budgeted:
        raise ValueError("plan_mixed needs a config with a budget (target_bpw or max_size)")
    schemes = candidates(config.mixed_bits, config.mixed_group_sizes)
    keys = [scheme_key(s) for s in schemes]
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
    t_measure = time.perf_counter() - t0
    t0 = time.perf_counter()
    budget, what = budget_bytes(meas, config)
    alloc = allocate(meas, budget, keys, _fixed_groups(meas, config), budget_name=what)
    t_alloc = time.perf_counter() - t0
    overrides = dict(config.overrides)
    for name, s in alloc.layers.items():
        overrides.setdefault(name, {"bits": s.bits, "group_size": s.group_size, "sym": s.sym})
    record = {
        "target_bpw": config.target_bpw,
        "max_size": config.max_size,
        "bpw": round(alloc.bpw, 6),
        "layer_bytes": alloc.bytes,
        "predicted_kl": alloc.predicted_kl,
        "candidates": keys,
        "measurement": meas.fingerprint[:16],
    }
    effective = config.replace(overrides=overrides, target_bpw=None, max_size=None, mixed=record)
    s = alloc.summary()
    logger.info("mixed precision: %.3f bpw over %d layers (%s), predicted KL %.4g (lower bound %.4g)",
                alloc.bpw, len(alloc.layers), s["layers_by_bits"], alloc.predicted_kl, alloc.lower_bound)
    return effective, {"allocation": s, "seconds": {"measure": t_measure, "allocate": t_alloc},
                       "measurement_seconds": meas.seconds}
