"""The training loop shared by recovery and distillation: two cores, resumable, honest about failure.

What it does, in order, each optimizer step: ``grad_accum`` micro-batches of ``batch_size`` windows
(drawn in a seeded order, one permutation of the training windows per epoch, so the sequence of
batches depends only on the seed and the step), the :class:`~llmquant.distill.loss.KDLoss` against
the cached teacher targets, a gradient-norm clip, the learning rate of the step (linear warm-up,
cosine decay to zero at ``steps``), the optimizer step.

* **Time limit**: with ``max_minutes`` the run stops (saving its state) once that much wall time has
  passed. So that the schedule still ends at zero inside the limit, the run times its steps (and the
  held-out evaluation it makes every ``eval_every`` steps) and, where ``steps`` would not fit, shortens
  the cosine to the steps that do (``steps_fitted`` in the summary): first after :data:`FIT_AFTER`
  steps, then again every :data:`REFIT_EVERY` steps from the last ones' times (the first steps of a
  run are often slower) until half the plan is done. The warm-up is then a tenth of the fitted steps,
  if that is shorter. The plan is saved with the state; a resumed run keeps it, so a run with a time
  limit depends on the machine's speed, but not on being resumed.

* **Optimizer**: bitsandbytes' 8-bit AdamW (``AdamW8bit``, which runs on CPU tensors since
  bitsandbytes 0.50) by default, ``torch.optim.AdamW`` as the alternative; the bytes of optimizer
  state are measured after the first step and logged. A group marked ``"sign": True`` (code offsets,
  :mod:`llmquant.distill.trainable`) is stepped by :class:`~llmquant.distill.trainable.SignDescent`
  instead, on the same schedule, and is left out of the gradient-norm clip (a sign does not care).
* **State**: every ``checkpoint_every`` steps, on Ctrl-C and at a time limit, the trained tensors,
  the optimizer state, the step and the log are written atomically to ``state_dir/state.pt``.
  Running again with the same state folder resumes there, and ends with the very tensors an
  uninterrupted run gives (the data order and the schedule are functions of the step).
* **Divergence**: a non-finite loss or gradient stops the run with :class:`TrainingDiverged`, which
  names the step; nothing is saved from that step on, so the state folder keeps the last good state.
* **Log**: one entry per step (loss and its parts, learning rate, tokens/s) plus held-out evaluations;
  :func:`write_log` writes it as JSON.
* **Zeros that stay zero**: ``pruned`` masks (parameter name -> bool, True where the weight was pruned)
  clear those entries of the gradient before the clip and of the weight after every optimizer step, so
  a sparse student keeps its sparsity exactly, whatever the optimizer's state does.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from llmquant.distill.loss import KDLoss, TopK, next_token_labels
from llmquant.fsutil import atomic_write_text

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw8bit", "adamw")
#: steps timed before the schedule is fitted to a time limit, and steps between later fits
FIT_AFTER = 3
REFIT_EVERY = 10
#: share of the time left that the fitted steps may fill (steps vary; the limit is a hard stop)
FIT_MARGIN = 0.97
STATE_VERSION = 1


class TrainingDiverged(FloatingPointError):
    """The loss or a gradient became NaN or infinite; the last good state is kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the state was saved and the same command resumes."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    #: stop (saving the state) once this much wall time has passed; the output is written as it stands
    max_minutes: float | None = None
    batch_size: int = 1
    grad_accum: int = 4
    warmup_steps: int | None = None  # default: a tenth of the steps, at most 20
    max_grad_norm: float = 1.0
    optimizer: str = "adamw8bit"
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 25
    #: held-out windows evaluated every ``eval_every`` steps (and at the start and end)
    eval_every: int = 25

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"batch_size and grad_accum must be at least 1, got {self.batch_size}, {self.grad_accum}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; known: {list(OPTIMIZERS)}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be positive, got {self.max_minutes}")

    def warmup(self) -> int:
        return min(20, self.steps // 10) if self.warmup_steps is None else self.warmup_steps


def lr_factor(step: int, config: TrainConfig, total: int | None = None) -> float:
    """Learning-rate multiplier of ``step`` (0-based): linear warm-up, then cosine to zero at ``total``
    steps (default ``config.steps``; fewer when the schedule was fitted to a time limit)."""
    total = config.steps if total is None else total
    w = config.warmup() if total >= config.steps else min(config.warmup(), total // 10)
    if step < w:
        return (step + 1) / (w + 1)
    span = max(1, total - w)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - w) / span)))


def fit_steps(requested: int, done: int, elapsed_s: float, budget_s: float, step_s: float,
              overhead_s: float = 0.0) -> int | None:
    """Steps a time limit allows: ``done`` so far plus as many more as ``FIT_MARGIN`` of the time left
    holds at ``step_s`` seconds a step plus ``overhead_s`` (evaluations, shared out per step); None when
    ``requested`` fits. At least one step more than ``done``."""
    if not step_s > 0:
        raise ValueError(f"fit_steps: a step must take some time, got {step_s}")
    more = int(FIT_MARGIN * (budget_s - elapsed_s) / (step_s + overhead_s))
    fitted = max(done + 1, done + more)
    return None if fitted >= requested else fitted


def make_optimizer(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    groups = [dict(g, weight_decay=g.get("weight_decay", config.weight_decay)) for g in groups]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, betas=(0.9, 0.95))
    # its CPU backend warns at import that an optional GPU-kernel package is missing; nothing here uses it
    noisy = logging.getLogger("bitsandbytes")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ModuleNotFoundError(
            "the default optimizer is bitsandbytes' AdamW8bit: pip install 'llmquant[train]', or choose "
            "optimizer='adamw' (--optimizer adamw)") from None
    finally:
        noisy.setLevel(level)
    return bnb.optim.AdamW8bit(groups, betas=(0.9, 0.95))


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


class Trainer:
    """Trains the parameters in ``groups`` (dicts with ``params``, ``lr``, ``name``) of ``model``.

    ``windows`` int64 [N, T] are the training windows and ``targets`` their teacher top-k (None for a
    pure cross-entropy loss); ``heldout``/``heldout_targets`` are evaluated (no gradient) for the log.
    ``buffers`` (name -> tensor) are saved with the state and restored on resume as they are, untrained
    (codes that an earlier phase of the run changed). ``pruned`` (trained parameter name -> bool tensor of
    its shape): entries held at exactly zero (a pruned student's zeros).
    """

    def __init__(self, model: nn.Module, groups: list[dict], windows: torch.Tensor, targets: TopK | None,
                 loss: KDLoss, config: TrainConfig, state_dir: str | os.PathLike | None = None,
                 heldout: torch.Tensor | None = None, heldout_targets: TopK | None = None,
                 progress: bool = True, identity: dict | None = None,
                 buffers: dict[str, torch.Tensor] | None = None,
                 pruned: dict[str, torch.Tensor] | None = None) -> None:
        self.model, self.windows, self.targets, self.loss, self.config = model, windows, targets, loss, config
        self.heldout, self.heldout_targets = heldout, heldout_targets
        self.progress = progress
        self.state_dir = None if state_dir is None else Path(state_dir)
        #: what must not change across a resume (the data and the loss), beside the config
        self.identity = dict(identity or {}, windows=list(windows.shape), loss=asdict(loss),
                             batch_size=config.batch_size, grad_accum=config.grad_accum, seed=config.seed)
        trained = {id(p) for g in groups for p in g["params"]}
        self.named = {n: p for n, p in model.named_parameters() if id(p) in trained}
        if not self.named:
            raise ValueError("nothing to train: the parameter groups are empty")
        for p in model.parameters():
            p.requires_grad_(id(p) in trained)
        self.buffers = dict(buffers or {})
        self.pruned = dict(pruned or {})
        for n, m in self.pruned.items():
            p = self.named.get(n)
            if p is None or m.shape != p.shape or m.dtype != torch.bool:
                raise ValueError(f"pruned mask {n!r}: expected a bool mask of a trained parameter"
                                 f"{'' if p is None else f' of shape {tuple(p.shape)}'}, got {m.dtype} {tuple(m.shape)}")
        self._hold_zeros()
        adam = [{k: v for k, v in g.items() if k != "sign"} for g in groups if not g.get("sign")]
        signed = [{k: v for k, v in g.items() if k != "sign"} for g in groups if g.get("sign")]
        if not adam:
            raise ValueError("a signed-gradient group (code offsets) trains only beside an Adam group (scales)")
        #: ids of the parameters SignDescent steps (kept out of the gradient-norm clip)
        self._signed = {id(p) for g in signed for p in g["params"]}
        self.base_lr = [g["lr"] for g in adam] + [g["lr"] for g in signed]
        self.opt = make_optimizer(adam, config)
        self.sign_opt = None
        if signed:
            from llmquant.distill.trainable import SignDescent

            self.sign_opt = SignDescent(signed, lr=signed[0]["lr"], momentum=signed[0].get("momentum", 0.0))
        self.step = 0
        #: the step count the schedule was fitted to (a time limit), None while it is ``config.steps``
        self.fitted: int | None = None
        #: wall clock (seconds); a test may put its own
        self.clock: Callable[[], float] = time.perf_counter
        self.log: list[dict] = []
        self.evals: list[dict] = []
        self._perms: dict[int, torch.Tensor] = {}
        self._warned_passes = False

    def _param_groups(self) -> list[dict]:
        return self.opt.param_groups + ([] if self.sign_opt is None else self.sign_opt.param_groups)

    @property
    def planned(self) -> int:
        """The step at which the schedule ends: ``config.steps``, or fewer when fitted to a time limit."""
        return self.fitted or self.config.steps

    @property
    def windows_per_step(self) -> int:
        return self.config.grad_accum * self.config.batch_size

    def passes(self, steps: int) -> float:
        """How many times ``steps`` steps go over the training windows (1.0: each window once)."""
        return steps * self.windows_per_step / self.windows.shape[0]

    def _warn_repeats(self) -> None:
        """Say so (once a run) when the plan goes over the training text more than once."""
        passes = self.passes(self.planned)
        if passes > 1.0 and not self._warned_passes:
            self._warned_passes = True
            logger.warning(
                "%d steps of %d windows go over the %d training windows %.1f times: once the text repeats, "
                "the held-out loss usually stops improving while the training loss keeps falling; more "
                "windows (max_windows / --max-windows, or a larger source) help more than repeats",
                self.planned, self.windows_per_step, self.windows.shape[0], passes)

    # --- data order ------------------------------------------------------------------------------
    def batch_rows(self, micro: int) -> torch.Tensor:
        """Row indices of global micro-batch ``micro``: positions of the concatenated per-epoch permutations."""
        n, b = self.windows.shape[0], self.config.batch_size
        rows = []
        for pos in range(micro * b, (micro + 1) * b):
            epoch, r = divmod(pos, n)
            perm = self._perms.get(epoch)
            if perm is None:
                g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
                perm = self._perms.setdefault(epoch, torch.randperm(n, generator=g))
            rows.append(int(perm[r]))
        return torch.tensor(rows)

    # --- state -----------------------------------------------------------------------------------
    def _state_path(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / "state.pt"

    def save_state(self) -> None:
        path = self._state_path()
        if path is None:
            return
        bad = [n for n, p in self.named.items() if not torch.isfinite(p).all()]
        if bad:
            logger.warning("not saving state at step %d: non-finite values in %s", self.step, bad[:3])
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"version": STATE_VERSION, "step": self.step, "fitted": self.fitted,
                    "identity": self.identity,
                    "params": {n: p.detach() for n, p in self.named.items()}, "buffers": self.buffers,
                    "optimizer": self.opt.state_dict(),
                    "sign_optimizer": None if self.sign_opt is None else self.sign_opt.state_dict(),
                    "log": self.log, "evals": self.evals}, tmp)
        os.replace(tmp, path)

    def try_resume(self) -> bool:
        path = self._state_path()
        if path is None or not path.exists():
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{path}: training state version {state.get('version')}, expected {STATE_VERSION}")
        if state["identity"] != self.identity:
            diff = sorted(k for k in set(state["identity"]) | set(self.identity)
                          if state["identity"].get(k) != self.identity.get(k))
            raise ValueError(f"{path} is the state of another run (differs in {diff}); remove {path.parent} to "
                             "start over, or give another output")
        missing = (set(self.named) ^ set(state["params"])) | (set(self.buffers) ^ set(state.get("buffers", {})))
        if missing:
            raise ValueError(f"{path}: trained tensors differ from this run's ({sorted(missing)[:3]})")
        with torch.no_grad():
            for n, p in self.named.items():
                p.copy_(state["params"][n])
            for n, b in self.buffers.items():
                b.copy_(state["buffers"][n])
        self.opt.load_state_dict(state["optimizer"])
        if self.sign_opt is not None:
            if state.get("sign_optimizer") is None:
                raise ValueError(f"{path}: the state has no signed-gradient optimizer state; this run has one")
            self.sign_opt.load_state_dict(state["sign_optimizer"])
        self.step, self.log, self.evals = state["step"], state["log"], state["evals"]
        self.fitted = state.get("fitted")
        logger.info("resumed from %s at step %d", path, self.step)
        return True

    @torch.no_grad()
    def _hold_zeros(self) -> None:
        for n, m in self.pruned.items():
            self.named[n].masked_fill_(m, 0)

    # --- one step --------------------------------------------------------------------------------
    def _forward_loss(self, rows: torch.Tensor) -> tuple[torch.Tensor, dict]:
        ids = self.windows[rows]
        logits = self.model(input_ids=ids, use_cache=False).logits
        target = None if self.targets is None else self.targets[rows]
        return self.loss(logits, target, next_token_labels(ids))

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Mean loss (and parts) over the held-out windows."""
        if self.heldout is None or self.heldout.shape[0] == 0:
            return None
        total: dict[str, float] = {}
        n = self.heldout.shape[0]
        for i in range(n):
            ids = self.heldout[i:i + 1]
            logits = self.model(input_ids=ids, use_cache=False).logits
            target = None if self.heldout_targets is None else self.heldout_targets[i:i + 1]
            loss, parts = self.loss(logits, target, next_token_labels(ids))
            for k, v in dict(parts, loss=float(loss)).items():
                total[k] = total.get(k, 0.0) + v / n
        entry = {"step": self.step, **total}
        self.evals.append(entry)
        return entry

    def run(self, on_step: Callable[[int], None] | None = None) -> dict:
        """Train to ``config.steps`` (or the time limit); returns the summary. ``on_step(step)`` is called
        after every completed step (a progress hook)."""
        cfg = self.config
        resumed_at = self.step if self.try_resume() else None
        self.model.eval()  # no dropout: the loss is a deterministic function of the step
        clock = self.clock
        t0 = clock()
        stopped = "steps"
        state_bytes = None
        tokens_per_step = self.windows_per_step * self.windows.shape[1]
        if not self.evals:
            self.evaluate()
        eval_s = clock() - t0
        step_times: list[float] = []
        # a resumed run keeps the plan it saved
        may_fit = cfg.max_minutes is not None and (resumed_at is None or self.fitted is None)
        if not may_fit:
            self._warn_repeats()
        bar = tqdm(total=self.planned, initial=self.step, desc="train", unit="step",
                   disable=not self.progress)
        try:
            while self.step < self.planned:
                if cfg.max_minutes is not None and clock() - t0 > 60 * cfg.max_minutes:
                    stopped = "max_minutes"
                    break
                ts = clock()
                self.opt.zero_grad(set_to_none=True)
                if self.sign_opt is not None:
                    self.sign_opt.zero_grad(set_to_none=True)
                sums: dict[str, float] = {}
                for m in range(cfg.grad_accum):
                    loss, parts = self._forward_loss(self.batch_rows(self.step * cfg.grad_accum + m))
                    if not torch.isfinite(loss):
                        raise self._diverged("loss", float(loss.detach()))
                    (loss / cfg.grad_accum).backward()
                    for k, v in dict(parts, loss=float(loss.detach())).items():
                        sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
                for n, m in self.pruned.items():
                    g = self.named[n].grad
                    if g is not None:
                        g.masked_fill_(m, 0)
                params = [p for p in self.named.values() if p.grad is not None and id(p) not in self._signed]
                norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)) if params else 0.0
                if not math.isfinite(norm):
                    raise self._diverged("gradient norm", norm)
                factor = lr_factor(self.step, cfg, self.fitted)
                for g, base in zip(self._param_groups(), self.base_lr):
                    g["lr"] = base * factor
                self.opt.step()
                if self.sign_opt is not None:
                    self.sign_opt.step()
                self._hold_zeros()
                if state_bytes is None:
                    state_bytes = optimizer_state_bytes(self.opt)
                self.step += 1
                dt = clock() - ts
                step_times.append(dt)
                self.log.append({"step": self.step, **{k: round(v, 6) for k, v in sums.items()},
                                 "grad_norm": round(norm, 6), "lr_factor": round(factor, 6),
                                 "seconds": round(dt, 3), "tokens_per_s": round(tokens_per_step / dt, 1)})
                bar.update(1)
                bar.set_postfix(loss=f"{sums['loss']:.4f}", tok_s=f"{tokens_per_step / dt:.0f}")
                if (may_fit and len(step_times) >= FIT_AFTER and self.step < self.planned / 2
                        and (len(step_times) - FIT_AFTER) % REFIT_EVERY == 0):
                    self._fit(cfg, clock() - t0, step_times[-REFIT_EVERY:], eval_s, bar)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.planned:
                    self.evaluate()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_state()
                if on_step is not None:
                    on_step(self.step)
        except KeyboardInterrupt:
            bar.close()
            self.save_state()
            raise TrainingInterrupted(
                f"interrupted at step {self.step} of {self.planned}; the state is saved in "
                f"{self.state_dir}: run the same command again to resume") from None
        bar.close()
        if stopped == "steps" and self.fitted is not None:
            stopped = "fitted_schedule"
        if stopped != "steps":
            self.save_state()
        final = self.evaluate()
        wall = clock() - t0
        done = self.step - (resumed_at or 0)
        return {
            "steps": self.step, "steps_planned": cfg.steps, "steps_fitted": self.fitted, "stopped_by": stopped,
            "resumed_at": resumed_at,
            "seconds": round(wall, 1), "tokens": self.step * tokens_per_step,
            "passes": round(self.passes(self.step), 3),
            "tokens_per_s": round(done * tokens_per_step / wall, 1) if wall > 0 else None,
            "optimizer": cfg.optimizer, "optimizer_state_bytes": state_bytes,
            "trained_parameters": sum(p.numel() for p in self.named.values()),
            "heldout_first": self.evals[0] if self.evals else None, "heldout_last": final,
            "config": asdict(cfg), "log": self.log, "evals": self.evals,
        }

    def _fit(self, cfg: TrainConfig, elapsed_s: float, step_times: list[float], eval_s: float, bar) -> None:
        """Shorten the schedule to the steps the time limit holds (see the module docstring)."""
        step_s = sum(step_times) / len(step_times)
        overhead = eval_s / cfg.eval_every if cfg.eval_every else 0.0
        fitted = fit_steps(cfg.steps, self.step, elapsed_s, 60 * cfg.max_minutes, step_s, overhead)
        if fitted != self.fitted:
            logger.info("%d steps of %.1f s %s in %g minutes: the schedule decays to zero at step %d",
                        cfg.steps, step_s, "fit" if fitted is None else "do not fit", cfg.max_minutes,
                        fitted or cfg.steps)
            self.fitted = fitted
            bar.total = self.planned
            bar.refresh()
        self._warn_repeats()

    def _diverged(self, what: str, value: float) -> TrainingDiverged:
        saved = self._state_path()
        where = (f"the last good state is kept in {saved.parent} (saved every {self.config.checkpoint_every} steps): "
                 "lower the learning rate and run again to resume from it" if saved and saved.exists()
                 else "no state was saved yet: lower the learning rate and start again")
        return TrainingDiverged(f"training stopped at step {self.step + 1}: the {what} is {value}; {where}")


def describe_steps(summary: dict) -> str:
    """``"170/400 steps (...)"``: the steps done, of how many, and what ended the run, in words."""
    done, asked, fitted = summary["steps"], summary["steps_planned"], summary.get("steps_fitted")
    why = summary["stopped_by"]
    if fitted is None:
        return f"{done}/{asked} steps (stopped by {why})"
    limit = summary.get("config", {}).get("max_minutes")
    fit = f"the {limit:.4g}-minute limit" if limit else "a time limit"
    stop = "" if why == "fitted_schedule" else f"; stopped by {why}"
    return f"{done}/{asked} steps (the schedule fitted to {fit}, {fitted} steps{stop})"


def write_log(path: str | os.PathLike, summary: dict) -> None:
    atomic_write_text(path, json.dumps(summary, indent=1))
