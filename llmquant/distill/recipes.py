"""The two training jobs: ``recover`` (a quantized checkpoint learns from its float teacher, format
kept) and ``distill`` (any float student learns from a teacher with the same tokenizer).

Both: check everything that can be checked before the long part (the input is an llmquant checkpoint,
the tokenizers match, the output does not exist yet), cut the training text into windows (the
built-in calibration corpora, never the evaluation set; the last ``heldout`` windows are kept out of
training and evaluated for the log), run the teacher once for its top-k targets (cached in the state
folder), free the teacher, train (:class:`~llmquant.distill.trainer.Trainer`), and write the result
atomically. The state folder (``OUT.state`` unless given) holds the teacher targets and the resumable
training state; it is removed after a successful run. The training log (JSON) is written into the
output folder as ``llmquant_training.json``.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from llmquant.calibration import training_windows
from llmquant.checkpoint import save_quantized, storage_dtype, validate_loaded
from llmquant.distill.blockwise import blockwise_phase
from llmquant.distill.loss import KDLoss
from llmquant.distill.teacher import TokenizerMismatch, check_same_tokenizer, load_or_compute
from llmquant.distill.trainable import TrainableQuantLinear, close_after_training, open_for_training
from llmquant.distill.trainer import TrainConfig, Trainer, write_log
from llmquant.fsutil import atomic_directory
from llmquant.models import bos_for_raw_text, load_model, resolve
from llmquant.registry import Method, register_method

logger = logging.getLogger(__name__)

LOG_FILE = "llmquant_training.json"


@dataclass(frozen=True)
class DataConfig:
    """The training text and the teacher's targets."""

    source: str = "builtin"  # a calibration source (llmquant.calibration); "news+pydoc" joins two
    seqlen: int = 256
    heldout: int = 4  # windows kept out of training, evaluated for the log
    top_k: int = 64
    temperature: float = 1.0
    alpha: float = 1.0  # weight of the KL term; 1 - alpha goes to cross-entropy on the text
    #: at most this many windows (held-out ones included), drawn evenly at random from the whole text with a
    #: fixed seed and kept in text order: a large source without a teacher pass over all of it
    max_windows: int | None = None

    def loss(self) -> KDLoss:
        return KDLoss(self.temperature, self.alpha)


@dataclass(frozen=True)
class RecoverConfig:
    """What ``recover`` trains. Scales always (relative learning rate ``lr``: s = s0 * exp(u)).

    The loss defaults to half KL to the teacher, half cross-entropy on the text (``alpha=0.5``): on
    gemma3-270m INT3 and INT4 it removed more of the quantization damage than KL alone in every pair of
    runs measured (README, evals/results/recover_*)."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100))
    data: DataConfig = field(default_factory=lambda: DataConfig(alpha=0.5))
    lr: float = 1e-3
    #: in the block-wise phase, let every code move one step up or down (signed gradient on a bounded offset,
    #: llmquant.distill.trainable); the end-to-end phase keeps the codes the block-wise phase left
    train_codes: bool = False
    #: the offsets' signed-gradient step, in quantization steps, at the top of each block's cosine schedule
    #: (not multiplied by blockwise_lr_mult): within a block an offset moves at most about lr_codes * steps / 2
    lr_codes: float = 2e-2
    #: in the end-to-end phase, let every code move one step up or down from the one the phase starts with
    #: (the same signed-gradient offsets, on the training loss; after a block-wise phase with train_codes,
    #: from the codes that phase left)
    end_to_end_codes: bool = False
    #: the end-to-end offsets' signed-gradient step at the top of the schedule (it follows the scales'
    #: warm-up and cosine): an offset moves at most about lr_codes_end_to_end * steps / 2
    lr_codes_end_to_end: float = 5e-3
    #: the end-to-end offsets move by the sign of their gradient's running mean (momentum b; 0: of each
    #: step's own gradient, which a batch of a few windows makes mostly noise)
    momentum_codes_end_to_end: float = 0.0
    train_norms: bool = False  # the float norm weights too (stored as they are, format unchanged)
    lr_norms: float = 1e-4
    #: block-wise reconstruction first (llmquant.distill.blockwise): Adam steps per block, on this many windows
    blockwise_steps: int = 0
    blockwise_windows: int = 64
    #: the block phase's learning rates are the end-to-end ones times this (its loss, a relative MSE of one
    #: block's output, gives much smaller gradients than the KL of the logits)
    blockwise_lr_mult: float = 5.0

    def __post_init__(self) -> None:
        if self.train_codes and self.blockwise_steps <= 0:
            raise ValueError("train_codes re-rounds codes in the block-wise phase: set blockwise_steps "
                             "(--blockwise-steps) too")
        if not self.lr_codes > 0:
            raise ValueError(f"lr_codes must be positive, got {self.lr_codes}")
        if not self.lr_codes_end_to_end > 0:
            raise ValueError(f"lr_codes_end_to_end must be positive, got {self.lr_codes_end_to_end}")
        if not 0.0 <= self.momentum_codes_end_to_end < 1.0:
            raise ValueError(f"momentum_codes_end_to_end must lie in [0, 1), got {self.momentum_codes_end_to_end}")


@dataclass(frozen=True)
class DistillConfig:
    """What ``distill`` trains: every float parameter of the student except, by default, the embedding
    and output layer (the largest matrices of a small model, and the costliest to update on a CPU).

    A student pruned to zeros (``llmquant prune --method ...``: its config names the layers in
    ``sparsity_config``) keeps those zeros exactly by default; ``keep_sparsity=False`` lets them train
    like any weight (the result is then dense, and its config no longer claims a sparsity)."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=200))
    data: DataConfig = field(default_factory=DataConfig)
    lr: float = 1e-4
    train_embeddings: bool = False
    keep_sparsity: bool = True


def _read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ValueError(f"{path}: not a model folder (no config.json)")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg}: not valid JSON ({e})") from None


def check_llmquant_checkpoint(path: str) -> Path:
    p = Path(path)
    qc = _read_config(p).get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "llmquant":
        found = "none" if not isinstance(qc, dict) else repr(qc.get("quant_method"))
        raise ValueError(f"{path}: not an llmquant checkpoint (quantization_config.quant_method is {found}); "
                         "quantize it first with llmquant quantize")
    return p


def _check_output(out: str, overwrite: bool) -> None:
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")


def _norm_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if type(m).__name__.endswith(("RMSNorm", "LayerNorm"))
            for p in m.parameters(recurse=False)]


def _vocab(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    return head.out_features if hasattr(head, "out_features") else head.weight.shape[0]


def _prepare_data(teacher_name: str, student, student_tok, data: DataConfig, state_dir: Path, progress: bool,
                  keep_teacher: bool = False, teacher_cache: Path | None = None):
    """(train windows, their targets, held-out windows, their targets, the teacher if ``keep_teacher``
    else None); the teacher is loaded, run and (unless kept) freed."""
    teacher, teacher_tok = load_model(teacher_name, dtype=torch.float32)
    tv, sv = _vocab(teacher), _vocab(student)
    if tv != sv:
        raise TokenizerMismatch(f"teacher {teacher_name} has {tv} output logits, the student {sv}: distillation "
                                "needs the same tokenizer and vocabulary")
    check_same_tokenizer(teacher_tok, student_tok)
    windows = training_windows(student_tok, data.source, data.seqlen, bos=bos_for_raw_text(teacher_name, student_tok))
    if data.max_windows is not None:
        if data.max_windows <= data.heldout:
            raise ValueError(f"max_windows={data.max_windows} leaves no window beside the {data.heldout} held out")
        windows = subsample_windows(windows, data.max_windows)
    if windows.shape[0] <= data.heldout:
        raise ValueError(f"training text {data.source!r} gives {windows.shape[0]} windows of {data.seqlen} tokens, "
                         f"not more than the {data.heldout} held out")
    targets = load_or_compute(teacher_cache or state_dir / "teacher_topk.safetensors", teacher, windows, data.top_k,
                              data.temperature, progress)
    if not keep_teacher:
        del teacher
        gc.collect()
        teacher = None
    n = windows.shape[0] - data.heldout
    return windows[:n], targets[:n], windows[n:], targets[n:], teacher


def subsample_windows(windows: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` of ``windows``' rows drawn at random (seed 0), in their original order; all if there are fewer."""
    if windows.shape[0] <= n:
        return windows
    rows = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(0))[:n].sort().values
    return windows[rows]


def pruned_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> bool mask of the zeros of every layer the model's ``sparsity_config`` lists
    (written by unstructured/N:M pruning); empty for a dense model. A listed layer that is missing or
    not a float linear layer is an error: the config does not describe this model."""
    sc = getattr(getattr(model, "config", None), "sparsity_config", None)
    if not sc:
        return {}
    layers = sc.get("layers") if isinstance(sc, dict) else None
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"sparsity_config in the student's config names no layers: {str(sc)[:200]}")
    masks = {}
    for name in layers:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"sparsity_config names layer {name!r}, which this model does not have") from None
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
            raise ValueError(f"sparsity_config names {name!r}, which is not a float linear layer ({type(mod).__name__})")
        masks[f"{name}.weight"] = w.detach() == 0
    return masks


def _identity(teacher: str, data: DataConfig, **more) -> dict:
    return {"teacher": str(resolve(teacher)), "data": asdict(data), **more}


@torch.no_grad()
def _codes_moved(layers: list[TrainableQuantLinear]) -> tuple[int, int]:
    """(codes whose current value differs from the frozen one, all codes) of ``layers``."""
    return (sum(int(m.current_codes().ne(m.codes).sum()) for m in layers), sum(m.codes.numel() for m in layers))


def recover(checkpoint: str, out: str, teacher: str, config: RecoverConfig = RecoverConfig(), *,
            state_dir: str | None = None, overwrite: bool = False, progress: bool = True,
            teacher_cache: str | None = None) -> dict:
    """Train the scales (and optionally codes and norms) of llmquant ``checkpoint`` against ``teacher``
    (a built-in name or a folder), write an ordinary llmquant checkpoint to ``out``; returns the summary.
    ``teacher_cache``: as for :func:`distill`."""
    t0 = time.perf_counter()
    check_llmquant_checkpoint(checkpoint)
    _check_output(out, overwrite)
    state = Path(state_dir) if state_dir else Path(str(out).rstrip("/") + ".state")
    student, tok = load_model(checkpoint, dtype=torch.float32)
    blockwise = config.blockwise_steps > 0 and not (state / "state.pt").exists()  # a resumed run did it already
    train, train_t, held, held_t, teacher_model = _prepare_data(
        teacher, student, tok, config.data, state, progress, keep_teacher=blockwise,
        teacher_cache=Path(teacher_cache) if teacher_cache else None)
    n_layers = open_for_training(student, train_codes=config.train_codes or config.end_to_end_codes)
    layers = [m for m in student.modules() if isinstance(m, TrainableQuantLinear)]
    groups = [{"name": "scales", "params": [m.log_scale for m in layers], "lr": config.lr}]
    if config.train_norms:
        groups.append({"name": "norms", "params": _norm_params(student), "lr": config.lr_norms})
    block_report = None
    if blockwise:
        lrs = {id(p): g["lr"] * config.blockwise_lr_mult for g in groups for p in g["params"]}
        sign_lrs = {id(m.offset): config.lr_codes for m in layers} if config.train_codes else None
        block_report = blockwise_phase(student, teacher_model, train[: config.blockwise_windows], lrs,
                                       config.blockwise_steps, seed=config.train.seed, progress=progress,
                                       sign_lrs=sign_lrs)
        del teacher_model
        gc.collect()
    codes = None
    if config.train_codes:  # the end-to-end phase starts from the codes the block phase left
        if block_report is not None:
            block_report["codes_changed"], block_report["codes"] = _codes_moved(layers)
        for m in layers:
            m.freeze_codes()
        codes = {f"{name}.codes": m.codes for name, m in student.named_modules() if isinstance(m, TrainableQuantLinear)}
    if config.end_to_end_codes:  # ... and moves them again (offsets at 0), or keeps them (scales and norms only)
        if config.train_codes:
            for m in layers:
                m.reopen_codes()
        groups.append({"name": "codes", "params": [m.offset for m in layers], "lr": config.lr_codes_end_to_end,
                       "momentum": config.momentum_codes_end_to_end, "sign": True})
    train_config = config.train
    if blockwise and train_config.max_minutes is not None:  # the time limit covers both phases
        left = train_config.max_minutes - block_report["seconds"] / 60
        if left <= 0:
            logger.warning("the block-wise phase took %.1f min of the %.1f min allowed; no end-to-end step runs",
                           block_report["seconds"] / 60, train_config.max_minutes)
        train_config = dataclasses.replace(train_config, max_minutes=max(left, 1e-6))
    trainer = Trainer(student, groups, train, train_t, config.data.loss(), train_config, state, held, held_t,
                      progress, identity=_identity(teacher, config.data, checkpoint=str(Path(checkpoint).resolve()),
                                                   train_codes=config.train_codes, train_norms=config.train_norms,
                                                   end_to_end_codes=config.end_to_end_codes,
                                                   blockwise_steps=config.blockwise_steps,
                                                   blockwise_lr_mult=config.blockwise_lr_mult),
                      buffers=codes)
    summary = trainer.run()
    if config.end_to_end_codes:
        summary["codes_changed_end_to_end"], summary["codes"] = _codes_moved(layers)
    close_after_training(student)
    for p in student.parameters():
        p.requires_grad_(False)
    validate_loaded(student)
    summary.update(job="recover", checkpoint=str(checkpoint), teacher=str(teacher), layers=n_layers, blockwise=block_report,
                   recover_config=asdict(config), wall_seconds=round(time.perf_counter() - t0, 1))
    _save(student, tok, out, state, summary, overwrite, quantized=True)
    return summary


def distill(teacher: str, student_path: str, out: str, config: DistillConfig = DistillConfig(), *,
            state_dir: str | None = None, overwrite: bool = False, progress: bool = True,
            teacher_cache: str | None = None) -> dict:
    """Train the float model ``student_path`` against ``teacher`` (same tokenizer); write it to ``out``
    as a plain Hugging Face checkpoint; returns the summary. ``teacher_cache``: a file for the teacher's
    top-k targets that outlives the run (several students of one teacher share it; it is checked
    against the teacher, windows, k and T before use), instead of one in the state folder."""
    t0 = time.perf_counter()
    _read_config(Path(resolve(student_path)))
    _check_output(out, overwrite)
    state = Path(state_dir) if state_dir else Path(str(out).rstrip("/") + ".state")
    student, tok = load_model(student_path, dtype=torch.float32)
    if getattr(student.config, "quantization_config", None) is not None:
        raise ValueError(f"{student_path} is quantized: distill trains float students; use recover for a "
                         "quantized checkpoint")
    train, train_t, held, held_t, _ = _prepare_data(teacher, student, tok, config.data, state, progress,
                                                    teacher_cache=Path(teacher_cache) if teacher_cache else None)
    frozen = set()
    if not config.train_embeddings:
        frozen = {id(p) for m in (student.get_input_embeddings(), student.get_output_embeddings())
                  for p in m.parameters()}
    params = [p for p in student.parameters() if p.is_floating_point() and id(p) not in frozen]
    masks = pruned_masks(student)
    if masks and not config.keep_sparsity:
        logger.info("%s: its zeros train like any weight (keep_sparsity off); the result is dense", student_path)
        del student.config.sparsity_config
        masks = {}
    trainer = Trainer(student, [{"name": "all", "params": params, "lr": config.lr}], train, train_t,
                      config.data.loss(), config.train, state, held, held_t, progress,
                      identity=_identity(teacher, config.data, student=str(resolve(student_path)),
                                         train_embeddings=config.train_embeddings,
                                         keep_sparsity=config.keep_sparsity),
                      pruned=masks)
    summary = trainer.run()
    if masks:
        zeros = sum(int(m.sum()) for m in masks.values())
        summary["sparsity_kept"] = {"layers": len(masks), "zeros": zeros,
                                    "sparsity": zeros / sum(m.numel() for m in masks.values())}
    for p in student.parameters():
        p.requires_grad_(False)
    summary.update(job="distill", student=str(student_path), teacher=str(teacher),
                   distill_config=asdict(config), wall_seconds=round(time.perf_counter() - t0, 1))
    _save(student, tok, out, state, summary, overwrite, quantized=False)
    return summary


def _save(model, tok, out: str, state: Path, summary: dict, overwrite: bool, quantized: bool) -> None:
    state.mkdir(parents=True, exist_ok=True)
    log = state / LOG_FILE
    write_log(log, summary)
    model._llmquant_extra_files = [*getattr(model, "_llmquant_extra_files", ()), log]
    if quantized:
        save_quantized(model, out, tokenizer=tok, overwrite=overwrite)
    else:
        model.to(storage_dtype(model))  # the dtype the student was stored in, not the one it trained in
        with atomic_directory(out, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            for extra in model._llmquant_extra_files:
                shutil.copy2(extra, tmp / Path(extra).name)
    shutil.rmtree(state, ignore_errors=True)
    logger.info("wrote %s; training state %s removed", out, state)


# --- the training jobs as registered methods (kind "train"), so that a recipe can chain them ----------
def config_from_flat(config_type, fields: dict):
    """A RecoverConfig/DistillConfig from one flat dict: its own fields, TrainConfig's and DataConfig's
    (``data`` may name the training text, DataConfig's ``source``)."""
    fields = dict(fields)
    fields.pop("method", None)
    if "data" in fields and not isinstance(fields["data"], (dict, DataConfig)):
        fields["source"] = fields.pop("data")
    defaults = {f.name: f.default_factory() for f in dataclasses.fields(config_type) if f.name in ("train", "data")}
    parts = {}
    for name, cls in (("train", TrainConfig), ("data", DataConfig)):
        names = {f.name for f in dataclasses.fields(cls)}
        # on top of the job's own defaults (recover: 100 steps, alpha 0.5; distill: 200 steps)
        parts[name] = dataclasses.replace(defaults[name], **{k: fields.pop(k) for k in list(fields) if k in names})
    own = {f.name for f in dataclasses.fields(config_type)}
    unknown = set(fields) - own
    if unknown:
        raise ValueError(f"{config_type.__name__}: unknown fields {sorted(unknown)}")
    return config_type(**parts, **fields)


class _TrainMethod(Method):
    kind = "train"

    def problems(self, config) -> list[str]:
        return []


@register_method
class DistillMethod(_TrainMethod):
    """``distill``: a float student against a teacher (the recipe's input model unless named)."""

    name = "distill"
    description = "train a float student against a teacher (KD on top-k logits)"
    config_type = DistillConfig


@register_method
class RecoverMethod(_TrainMethod):
    """``recover``: a quantized checkpoint's scales against its float teacher."""

    name = "recover"
    description = "train a quantized checkpoint's scales against its float teacher"
    config_type = RecoverConfig
