"""Gradual pruning: several prune -> distill rounds on a schedule down to the final size.

One-shot pruning removes everything at once and asks distillation to repair it; gradual pruning
removes a part, lets the student recover, then removes more, ranking the units on the recovered
student each time (Zhu & Gupta, 2017, "To prune, or not to prune"; Minitron's iterative variant).

Schedule: the fraction of decoder-block parameters removed after round t of n is
``p_t = p_final * (1 - (1 - t/n)^3)`` (cubic, Zhu & Gupta: large steps while the model is still
redundant, small ones near the end) or ``p_final * t/n`` (linear). Each round prunes the current
student to ``1 - p_t`` of the *original* block parameters (the StructuredConfig's axes and
calibration), then distills it against the original teacher for ``distill.train.steps / n`` steps,
so the whole schedule trains as long as one distillation of ``distill.train.steps`` steps.

Unstructured pruning (a :class:`SparsityConfig`: magnitude, Wanda, SparseGPT) runs the same rounds on
the sparsity: round t zeros ``s_t = s_final * frac_t`` of each layer's weights (Zhu & Gupta's original
setting); the zeros of earlier rounds are the smallest weights, so they stay pruned, and distillation
keeps them at zero (:class:`~llmquant.distill.recipes.DistillConfig` ``keep_sparsity``). An N:M pattern
has no intermediate sizes, and quantizing in the same pass belongs to the last step: both are refused.

Resumable: every finished round is a folder in the state directory (``OUT.gradual``) with a record
of the schedule; a rerun with the same arguments skips the rounds already done (a round interrupted
inside its distillation resumes from the trainer's own saved state). The teacher's targets are
computed once and shared by all rounds. The result is written atomically to OUT; the state directory
is removed afterwards.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

from llmquant.distill.recipes import DistillConfig, distill
from llmquant.fsutil import atomic_write_text
from llmquant.prune.config import PruneConfigError, SparsityConfig, StructuredConfig
from llmquant.prune.jobs import RECORD, prune

logger = logging.getLogger(__name__)

SCHEDULES = ("cubic", "linear")


def schedule(final_keep: float, rounds: int, kind: str = "cubic") -> list[float]:
    """The keep fraction (of the original block parameters) after each round; the last is ``final_keep``."""
    if kind not in SCHEDULES:
        raise PruneConfigError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    if not isinstance(rounds, int) or rounds < 1:
        raise PruneConfigError(f"rounds must be a positive int, got {rounds!r}")
    p = 1 - final_keep
    frac = [(1 - (1 - t / rounds) ** 3) if kind == "cubic" else t / rounds for t in range(1, rounds + 1)]
    return [1 - p * f for f in frac]


def gradual(model: str, out: str, final: StructuredConfig | SparsityConfig, distill_config: DistillConfig,
            rounds: int = 3, *, kind: str = "cubic", teacher: str | None = None, state_dir: str | None = None,
            overwrite: bool = False, progress: bool = True, teacher_cache: str | None = None) -> dict:
    """Prune ``model`` to ``final.keep`` (structured) or ``final.sparsity`` (unstructured) in ``rounds``
    prune -> distill rounds; write the student to ``out``. ``teacher_cache``: the teacher's top-k targets
    file shared with other runs (default: one in the state folder, shared by the rounds)."""
    t0 = time.perf_counter()
    sparse = isinstance(final, SparsityConfig)
    if sparse:
        if final.nm is not None:
            raise PruneConfigError(f"gradual pruning needs an unstructured target: an N:M pattern "
                                   f"({final.pattern}) has no intermediate sizes; prune to it in one step")
        if final.quantize is not None:
            raise PruneConfigError("gradual pruning does not quantize in the same pass; quantize the result "
                                   "(llmquant quantize) afterwards")
        if not distill_config.keep_sparsity:
            raise PruneConfigError("gradual unstructured pruning needs keep_sparsity: distillation would refill "
                                   "the zeros of every round")
        keeps = schedule(1 - final.sparsity, rounds, kind)
    elif not isinstance(final, StructuredConfig):
        raise PruneConfigError(f"gradual pruning takes a StructuredConfig or a SparsityConfig, got {type(final).__name__}")
    elif final.keep is None or any(v is not None for k, v in final.sizes().items() if k != "round_to"):
        raise PruneConfigError("gradual pruning needs a keep fraction, not explicit sizes")
    else:
        keeps = schedule(final.keep, rounds, kind)
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    teacher = teacher or model
    steps = max(1, distill_config.train.steps // rounds)
    round_cfg = dataclasses.replace(distill_config, train=dataclasses.replace(
        distill_config.train, steps=steps,
        max_minutes=None if distill_config.train.max_minutes is None else distill_config.train.max_minutes / rounds))
    state = Path(state_dir) if state_dir else Path(str(out).rstrip("/") + ".gradual")
    state.mkdir(parents=True, exist_ok=True)
    plan = {"model": str(model), "teacher": str(teacher), "final": final.to_dict(), "rounds": rounds, "kind": kind,
            "keeps": keeps, "distill": dataclasses.asdict(round_cfg)}
    plan_file = state / "gradual.json"
    if plan_file.exists():
        old = json.loads(plan_file.read_text())
        if old != json.loads(json.dumps(plan)):
            raise ValueError(f"{state} holds another gradual run ({old.get('model')} -> keep {old.get('keeps')}); "
                             "remove it or pass another state_dir")
    else:
        atomic_write_text(plan_file, json.dumps(plan, indent=1))
    current, original, current_block = str(model), None, None
    history = []
    for t, keep in enumerate(keeps, 1):
        pruned, student = state / f"round{t}-pruned", state / f"round{t}-distilled"
        if not pruned.exists():
            if sparse:  # each layer keeps its shape: the sparsity is of the original weights
                target = final.sparsity if t == rounds else 1 - keep  # the last exactly as asked
                logger.info("gradual round %d/%d: %s pruning to %.3f sparsity", t, rounds, final.method, target)
                prune(current, str(pruned), dataclasses.replace(final, sparsity=target), progress=progress)
            else:
                # the StructuredConfig's keep is relative to the model it prunes: the previous round's student
                rel = keep if original is None else keep * original / current_block
                logger.info("gradual round %d/%d: prune to %.3f of the original block parameters", t, rounds, keep)
                prune(current, str(pruned), dataclasses.replace(final, keep=min(1.0, rel)), progress=progress)
        rec = json.loads((pruned / RECORD).read_text())
        if sparse:
            entry = {"sparsity_target": rec["target_sparsity"], "sparsity": rec["sparsity"],
                     "kept_fraction": 1 - rec["sparsity"]}
        else:
            if original is None:
                original = rec["original_block_params"]
            current_block = rec["block_params"]
            entry = {"block_params": current_block, "kept_fraction": current_block / original, "shape": rec["shape"]}
        if not student.exists():
            distill(teacher, str(pruned), str(student), round_cfg, state_dir=str(state / f"round{t}.state"),
                    progress=progress, teacher_cache=teacher_cache or str(state / "teacher_topk.safetensors"))
        training = json.loads((student / "llmquant_training.json").read_text())
        history.append({"round": t, "keep_target": keep, **entry,
                        "heldout_last": training.get("heldout_last"), "steps": training.get("steps"),
                        "train_seconds": training.get("seconds")})
        current = str(student)
    summary = {"job": "gradual", **plan, "history": history, "wall_seconds": round(time.perf_counter() - t0, 1)}
    final_dir = Path(current)
    atomic_write_text(final_dir / "llmquant_gradual.json", json.dumps(summary, indent=1, default=str))
    if Path(out).exists():
        shutil.rmtree(out)
    shutil.move(str(final_dir), out)  # one rename within a file system: the output appears whole
    shutil.rmtree(state, ignore_errors=True)
    return summary

