"""Recipes: compression steps chained on model folders (prune -> distill -> quantize, or any order that
makes sense), each step a method from the one registry (:mod:`llmquant.registry`).

A recipe is a JSON file::

    {"model": "smollm2-135m",
     "steps": [
       {"method": "structured", "keep": 0.75, "axes": ["layers"]},
       {"method": "distill", "steps": 400, "lr": 2e-4, "data": "news+pydoc", "max_minutes": 45},
       {"method": "gptq", "bits": 4, "group_size": 128}
     ]}

Each step names a registered method and the fields of that method's config: a pruning method's
(:class:`~llmquant.prune.StructuredConfig` / :class:`~llmquant.prune.SparsityConfig`), a training
method's (``distill``/``recover``: the fields of DistillConfig/RecoverConfig, TrainConfig and DataConfig
in one flat dict, plus an optional ``teacher``; the default teacher is the recipe's input model), or a
quantization method's (QuantConfig's fields, plus ``calibration``/``nsamples``/``seqlen``). Every
config is built and checked before the first step runs, so a typo fails in a second, not after an hour.

Steps run on folders: step i reads step i-1's output and writes ``OUT.steps/NN-method``; a step whose
folder exists with the same step record (``llmquant_step.json``: the step and its input) is skipped,
so an interrupted recipe resumes. The last step's folder becomes OUT (atomically, by a rename); the
steps folder is removed.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

import llmquant.distill  # noqa: F401  (registers the training methods distill, recover)
import llmquant.prune  # noqa: F401  (registers the pruning methods)
from llmquant.fsutil import atomic_write_text
from llmquant.registry import get_method

logger = logging.getLogger(__name__)

STEP_RECORD = "llmquant_step.json"


class RecipeError(ValueError):
    """A recipe is malformed (unknown method, bad fields, bad order)."""


@dataclass(frozen=True)
class Step:
    method: str
    kind: str
    config: Any
    extra: dict  # teacher (train steps), calibration settings (quantize steps)
    spec: dict  # the step as written


def _quant_step(spec: dict) -> tuple[Any, dict]:
    from llmquant.config import QuantConfig

    fields = dict(spec)
    extra = {k: fields.pop(k) for k in ("calibration", "nsamples", "seqlen") if k in fields}
    for k, v in fields.items():
        if isinstance(v, list):
            fields[k] = tuple(v)
    return QuantConfig(**fields), extra


def _prune_step(spec: dict) -> tuple[Any, dict]:
    from llmquant.prune import PruneConfig

    return PruneConfig.from_dict(spec), {}


def _train_step(spec: dict) -> tuple[Any, dict]:
    from llmquant.distill.recipes import config_from_flat

    fields = dict(spec)
    teacher = fields.pop("teacher", None)
    return config_from_flat(get_method(spec["method"]).config_type, fields), {"teacher": teacher}


_PARSERS: dict[str, Callable[[dict], tuple[Any, dict]]] = {
    "quantize": _quant_step, "prune": _prune_step, "train": _train_step,
}


def parse_steps(steps: list[dict]) -> list[Step]:
    """Check and build every step's config (nothing runs)."""
    if not isinstance(steps, list) or not steps:
        raise RecipeError("a recipe needs a non-empty list of steps")
    out = []
    quantized = False
    for i, spec in enumerate(steps, 1):
        if not isinstance(spec, dict) or "method" not in spec:
            raise RecipeError(f"step {i}: expected an object with a 'method', got {spec!r}")
        try:
            method = get_method(spec["method"])
            config, extra = _PARSERS[method.kind](spec)
        except (KeyError, TypeError, ValueError) as e:
            raise RecipeError(f"step {i} ({spec.get('method')}): {e.args[0] if e.args else e}") from None
        if quantized and method.kind == "prune":
            raise RecipeError(f"step {i}: pruning after quantization is not supported; prune first")
        if quantized and method.kind == "quantize":
            raise RecipeError(f"step {i}: the model is already quantized by an earlier step")
        if method.name == "distill" and quantized:
            raise RecipeError(f"step {i}: distill trains float students; after quantization use 'recover'")
        if method.name == "recover" and not quantized:
            raise RecipeError(f"step {i}: recover needs a quantized model; quantize in an earlier step")
        quantized = quantized or method.kind == "quantize" or getattr(config, "quantize", None) is not None
        out.append(Step(method.name, method.kind, config, extra, spec))
    return out


def load_recipe(path: str | Path) -> dict:
    try:
        recipe = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise RecipeError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(recipe, dict) or "steps" not in recipe:
        raise RecipeError(f"{path}: expected an object with 'steps' (and optionally 'model')")
    return recipe


# --- running steps --------------------------------------------------------------------------------
def _run_quantize(step: Step, src: str, out: str, ctx: dict) -> dict:
    import llmquant
    from llmquant.calibration import calibration_batches
    from llmquant.models import bos_for_raw_text, load_model

    model, tok = load_model(src, dtype=torch.float32)
    calibration = None
    if get_method(step.config.method).needs_calibration or step.config.budgeted:
        calibration = calibration_batches(tok, step.extra.get("calibration", "builtin"), step.extra.get("nsamples", 128),
                                          step.extra.get("seqlen", 512), bos=bos_for_raw_text(ctx["model"], tok))
    summary = llmquant.quantize(model, step.config, calibration=calibration, progress=ctx["progress"])
    llmquant.save_quantized(model, out, tokenizer=tok)
    return {k: v for k, v in summary.items() if k in ("method", "layers", "seconds", "quantization_config")}


def _run_prune(step: Step, src: str, out: str, ctx: dict) -> dict:
    from llmquant.prune.jobs import prune

    s = prune(src, out, step.config, progress=ctx["progress"])
    return {k: v for k, v in s.items() if k not in ("importance", "modules", "layers")}


def _run_train(step: Step, src: str, out: str, ctx: dict) -> dict:
    from llmquant.distill import distill, recover

    teacher = step.extra.get("teacher") or ctx["model"]
    job = distill if step.method == "distill" else recover
    args = (teacher, src, out) if step.method == "distill" else (src, out, teacher)
    s = job(*args, step.config, progress=ctx["progress"])
    s.pop("log", None)
    return s


_RUNNERS = {"quantize": _run_quantize, "prune": _run_prune, "train": _run_train}


def run_recipe(model: str, steps: list[dict], out: str, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Run ``steps`` (see the module docstring) starting from ``model``; the result goes to ``out``."""
    t0 = time.perf_counter()
    parsed = parse_steps(steps)
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    work = Path(str(out).rstrip("/") + ".steps")
    work.mkdir(parents=True, exist_ok=True)
    ctx = {"model": model, "progress": progress}
    src, done = str(model), []
    for i, step in enumerate(parsed, 1):
        folder = work / f"{i:02d}-{step.method}"
        record = {"step": step.spec, "input": src}
        rec_file = folder / STEP_RECORD
        if folder.exists() and rec_file.exists() and json.loads(rec_file.read_text()).get("record") == record:
            logger.info("recipe step %d (%s): done already, reusing %s", i, step.method, folder)
            summary = json.loads(rec_file.read_text())["summary"]
        else:
            if folder.exists():
                shutil.rmtree(folder)  # a step that did not finish (its jobs write atomically; this is a leftover)
            logger.info("recipe step %d/%d: %s on %s", i, len(parsed), step.method, src)
            t = time.perf_counter()
            summary = _RUNNERS[step.kind](step, src, str(folder), ctx)
            summary["step_seconds"] = round(time.perf_counter() - t, 1)
            atomic_write_text(rec_file, json.dumps({"record": record, "summary": summary}, indent=1, default=str))
        done.append({"step": i, "method": step.method, "summary": summary})
        src = str(folder)
    result = {"model": model, "steps": done, "wall_seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_text(Path(src) / "llmquant_recipe.json", json.dumps(result, indent=1, default=str))
    if Path(out).exists():
        shutil.rmtree(out)
    shutil.move(src, out)
    shutil.rmtree(work, ignore_errors=True)
    return result
