"""The teacher: checked against the student, run once over the training text, its top-k kept on disk.

Two cores cannot afford a teacher forward at every step of every epoch, and full logits of a
262k-token vocabulary cannot be stored; so the teacher runs once over all training windows and
its :class:`~llmquant.distill.loss.TopK` targets are written (safetensors, atomically) into the run's
state folder, keyed by a fingerprint of the teacher, the text, k and the temperature. A resumed run
reads them back.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from llmquant.distill.loss import TopK
from llmquant.fsutil import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)


class TokenizerMismatch(ValueError):
    """Teacher and student do not share a tokenizer, so the teacher's targets mean nothing to the student."""


def check_same_tokenizer(teacher_tok, student_tok) -> None:
    """Refuse a teacher whose tokenizer maps any token to another id than the student's."""
    a, b = teacher_tok.get_vocab(), student_tok.get_vocab()
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()))[:3]
        raise TokenizerMismatch(
            f"teacher and student tokenizers differ ({len(a)} vs {len(b)} tokens; e.g. {diff}): distillation "
            "needs the same tokenizer")


def fingerprint(model: torch.nn.Module, windows: torch.Tensor, k: int, temperature: float) -> str:
    """A hash of the teacher's weights (sampled), the token windows, k and T."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        if p.is_floating_point():
            flat = p.detach().flatten()
            h.update(name.encode())
            h.update(flat[:: max(1, flat.numel() // 64)][:64].float().numpy().tobytes())
    h.update(windows.numpy().tobytes())
    h.update(json.dumps([k, temperature]).encode())
    return h.hexdigest()


@torch.no_grad()
def teacher_topk(teacher, windows: torch.Tensor, k: int, temperature: float, progress: bool = True,
                 batch: int = 4) -> TopK:
    """The teacher's top-k targets for every window (int64 [N, T])."""
    teacher.eval()
    parts = []
    bar = tqdm(range(0, windows.shape[0], batch), desc="teacher top-k", unit="batch", disable=not progress)
    for i in bar:
        logits = teacher(input_ids=windows[i:i + batch], use_cache=False).logits
        parts.append(TopK.from_logits(logits, k, temperature))
        del logits
    return TopK(torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts]),
                torch.cat([p.lse for p in parts]))


def load_or_compute(path: Path, teacher, windows: torch.Tensor, k: int, temperature: float,
                    progress: bool = True) -> TopK:
    """The cached targets at ``path`` if they were made from this teacher, text, k and T; else computed
    and written there."""
    fp = fingerprint(teacher, windows, k, temperature)
    if path.exists():
        try:
            data = load_file(str(path))
            meta = json.loads(path.with_suffix(".json").read_text())
        except (OSError, ValueError) as e:
            logger.warning("teacher cache %s unreadable (%s); recomputing", path, e)
        else:
            if meta.get("fingerprint") == fp:
                logger.info("teacher targets read from %s", path)
                return TopK(data["values"], data["indices"].to(torch.int64), data["lse"])
            logger.info("teacher cache %s is for another teacher, text, k or T; recomputing", path)
    target = teacher_topk(teacher, windows, k, temperature, progress)
    atomic_write_bytes(path, save({"values": target.values.contiguous(), "lse": target.lse.contiguous(),
                                   "indices": target.indices.to(torch.int32).contiguous()}))
    atomic_write_text(path.with_suffix(".json"), json.dumps(
        {"fingerprint": fp, "k": k, "temperature": temperature, "windows": list(windows.shape)}))
    return target
