"""Timing tables for latency budgets: how long one quantized layer takes to multiply one token
(M = 1, a decode step) on this machine, per layer shape and scheme, with llmquant's own kernels.

A ``--max-latency MS`` budget bounds the predicted decode time of the quantized layers, the sum of
their table entries; attention, norms, the embedding and a float head are not in it. A table is
only valid on the machine it was measured on (CPU model, the kernels' instruction set, threads and
activation dtype), and :func:`check_table` refuses any other, naming both.

    llmquant timing gemma3-270m timing.json      # measure the table for a model's layer shapes
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from llmquant.config import LayerQuant
from llmquant.fsutil import atomic_write_text
from llmquant.kernels import cpu_native
from llmquant.kernels.cpuinfo import cpu_name
from llmquant.mixed.cost import scheme_key
from llmquant.modules.quant_linear import QuantLinear, prepare_model
from llmquant.quantizers.rtn import make_packed

TABLE_VERSION = 1


class LatencyError(ValueError):
    """No usable timing table for a latency budget."""


def shape_key(n: int, k: int) -> str:
    return f"{n}x{k}"


def this_machine(dtype: torch.dtype, threads: int | None = None) -> dict[str, Any]:
    native, why = cpu_native.load()
    return {"cpu": cpu_name(), "isa": native.isa if native else f"reference ({why})",
            "threads": threads or torch.get_num_threads(), "dtype": str(dtype).replace("torch.", "")}


def _layer(n: int, k: int, scheme: LayerQuant, perm: bool, seed: int) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    gs = k if scheme.group_size == -1 else scheme.group_size
    ng = -(-k // gs)
    codes = torch.randint(0, 1 << scheme.bits, (n, k), generator=g)
    scale = torch.rand(n, ng, generator=g) * 0.01 + 0.001
    zero = torch.randint(0, 1 << scheme.bits, (n, ng), generator=g).float()
    p = torch.randperm(k, generator=g) if perm else None
    return QuantLinear.from_packed(make_packed(codes, scale, zero, scheme, perm=p), None)


def time_layer(n: int, k: int, scheme: LayerQuant, perm: bool, dtype: torch.dtype, reps: int = 50) -> float:
    """Median microseconds of one M = 1 forward of a quantized [N, K] layer (weights in cache: the
    table ranks schemes; a cold decode step reads every layer once from memory)."""
    layer = _layer(n, k, scheme, perm, seed=n * 31 + k)
    prepare_model(layer, dtype)
    x = torch.randn(1, k).to(dtype)
    with torch.no_grad():
        for _ in range(5):
            layer(x)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            layer(x)
            times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def measure_table(
    shapes: Iterable[tuple[int, int]], schemes: list[LayerQuant], perm: bool, dtype: torch.dtype = torch.float32,
    reps: int = 50, progress: bool = True,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    shapes = sorted(set(shapes))
    entries: dict[str, dict[str, float]] = {}
    todo = [(n, k, s) for n, k in shapes for s in schemes]
    for n, k, s in tqdm(todo, desc="timing", unit="layer", disable=not progress):
        entries.setdefault(shape_key(n, k), {})[scheme_key(s)] = time_layer(n, k, s, perm, dtype, reps)
    return {"version": TABLE_VERSION, "machine": this_machine(dtype), "perm": perm, "unit": "microseconds, M=1",
            "entries": entries}


def save_table(table: dict, path: str | Path) -> Path:
    atomic_write_text(Path(path), json.dumps(table, indent=1) + "\n")
    return Path(path)


def load_table(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        raise LatencyError(
            "a latency budget (max_latency) needs a timing table measured on this machine: make one with "
            "'llmquant timing MODEL FILE.json' and pass it (--timing-table / timing_table=)"
        )
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LatencyError(f"cannot read the timing table {path}: {e}") from None
    if not isinstance(table, dict) or table.get("version") != TABLE_VERSION or "entries" not in table:
        raise LatencyError(f"{path} is not a llmquant timing table (version {TABLE_VERSION})")
    return table


def check_table(table: dict, shapes: Iterable[tuple[int, int]], keys: list[str], perm: bool,
                dtype: torch.dtype = torch.float32) -> None:
    """Refuse a table made on another machine, for other activations, without act-order's perm when the
    layers have one, or lacking a needed (shape, scheme)."""
    here = this_machine(dtype)
    there = table.get("machine", {})
    diff = {k: (there.get(k), v) for k, v in here.items() if there.get(k) != v}
    if diff:
        raise LatencyError(
            "the timing table was measured on another machine or setting: "
            + "; ".join(f"{k} {a!r} in the table, {b!r} here" for k, (a, b) in diff.items())
            + " (measure one here with 'llmquant timing')"
        )
    if bool(table.get("perm")) != perm:
        raise LatencyError(f"the timing table was measured {'with' if table.get('perm') else 'without'} act-order's "
                           f"perm; these layers are {'with' if perm else 'without'} it")
    missing = [f"{shape_key(n, k)}:{key}" for n, k in sorted(set(shapes)) for key in keys
               if key not in table["entries"].get(shape_key(n, k), {})]
    if missing:
        raise LatencyError(f"the timing table lacks {len(missing)} (shape, scheme) entries, e.g. {missing[:4]}")
