"""The distillation loss, and the teacher's targets kept as top-k logits.

    loss = alpha * T**2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)

``teacher_T`` and ``student_T`` are the next-token distributions at temperature ``T`` (logits / T).
The ``T**2`` keeps the soft term's gradient on the scale of the hard one (Hinton et al.).

Gemma's vocabulary has 262,144 entries, so full teacher logits for a few hundred thousand training
tokens would take hundreds of GB. :class:`TopK` keeps, per token, the teacher's k largest logits
(already divided by T), their vocabulary ids, and the log-sum-exp over the *whole* vocabulary. That is
exactly the teacher distribution coarsened to k + 1 outcomes: the k tokens, and "any other token"
with the remaining mass. The KL is taken between the teacher's and the student's distributions
coarsened the same way, so it is a true KL divergence, never larger than the full one (coarsening
cannot increase it), and equal to it when k is the vocabulary size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100  # label of a position that is not scored (as in transformers)


@dataclass
class TopK:
    """Teacher targets of B sequences of T positions."""

    values: torch.Tensor  # float32 [B, T, k]: the k largest teacher logits / temperature, descending
    indices: torch.Tensor  # int64 [B, T, k]: their vocabulary ids
    lse: torch.Tensor  # float32 [B, T]: logsumexp of teacher logits / temperature over the whole vocabulary

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int, temperature: float) -> "TopK":
        """Top-k targets of full teacher logits [B, T, V]."""
        z = logits.float() / temperature
        k = min(k, z.shape[-1])
        values, indices = z.topk(k, dim=-1)
        return cls(values, indices, torch.logsumexp(z, dim=-1))

    def __getitem__(self, rows) -> "TopK":
        return TopK(self.values[rows], self.indices[rows], self.lse[rows])


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends; finite value and gradient everywhere.

    x is capped at -1e-7, i.e. the mass outside the top k is floored at 1e-7 (a distribution's top-k
    mass can round to 1 in float32, where the log would be -inf), and each branch of the ``where`` only ever sees inputs it is finite on: the
    gradient of the branch *not* taken is multiplied by zero, and 0 * inf would be NaN.
    """
    x = x.clamp(max=-1e-7)
    near0 = x > -0.6931
    a = torch.log(-torch.expm1(torch.where(near0, x, torch.full_like(x, -1.0))))
    b = torch.log1p(-torch.exp(torch.where(near0, torch.full_like(x, -1.0), x)))
    return torch.where(near0, a, b)


def topk_kl(student_logits: torch.Tensor, target: TopK, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per position, float32 [B, T], on the (k + 1)-outcome coarsening."""
    z = student_logits.float() / temperature
    logq_all = z - torch.logsumexp(z, dim=-1, keepdim=True)
    logq = logq_all.gather(-1, target.indices)  # [B, T, k]
    logp = target.values - target.lse.unsqueeze(-1)
    p = logp.exp()
    kl = (p * (logp - logq)).sum(-1)
    # the rest of the vocabulary as one outcome
    logp_rest = _log1mexp(torch.logsumexp(logp, dim=-1))
    logq_rest = _log1mexp(torch.logsumexp(logq, dim=-1))
    return kl + logp_rest.exp() * (logp_rest - logq_rest)


@dataclass(frozen=True)
class KDLoss:
    """``alpha * T**2 * KL + (1 - alpha) * CE``; see the module docstring."""

    temperature: float = 1.0
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")

    def __call__(self, student_logits: torch.Tensor, target: TopK | None, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Mean loss over the positions whose label is not ``IGNORE``, and its parts (floats).

        ``student_logits`` [B, T, V] predict position t + 1 at position t; ``labels`` [B, T] int64 are
        those next tokens; ``target`` the teacher's top-k at the same positions (None when alpha == 0).
        """
        mask = labels != IGNORE
        n = mask.sum().clamp(min=1)
        parts = {}
        loss = student_logits.new_zeros((), dtype=torch.float32)
        if self.alpha > 0:
            if target is None:
                raise ValueError("KDLoss: alpha > 0 needs teacher targets")
            kl = (topk_kl(student_logits, target, self.temperature) * mask).sum() / n
            loss = loss + self.alpha * self.temperature ** 2 * kl
            parts["kl"] = float(kl.detach())
        if self.alpha < 1:
            ce = F.cross_entropy(student_logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
            loss = loss + (1 - self.alpha) * ce
            parts["ce"] = float(ce.detach())
        return loss, parts


def next_token_labels(ids: torch.Tensor) -> torch.Tensor:
    """Labels [B, T] for logits at every position: ids shifted left, the last position ignored."""
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = ids[:, 1:]
    return labels
