"""Per-request sampling: greedy or temperature / top-p, each request with its own seeded generator.

Every request owns a ``torch.Generator`` (seeded from ``SamplingParams.seed``, or from the OS when no
seed is given), so one request's random draws never depend on which other requests share its decode
step: the same seed and prompt give the same tokens however the batch around them changes (up to the
last-bit float differences a different batch shape can cause in the logits).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: the range ``torch.Generator.manual_seed`` accepts
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops.

    ``temperature == 0`` is greedy (argmax; ``top_p`` and ``seed`` are then irrelevant).
    ``stop`` strings end the text before the first occurrence (the stop string is not returned).
    ``max_tokens`` counts generated tokens, including a final end-of-sequence token.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (SEED_MIN <= self.seed <= SEED_MAX):
            raise ValueError(f"seed must be in [{SEED_MIN}, {SEED_MAX}], got {self.seed}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()  # nondeterministic, from the OS
    else:
        g.manual_seed(seed)
    return g


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from ``logits`` (float [V]) under ``params``."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the most likely token always stays)
        keep = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < params.top_p
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        pick = torch.multinomial(sorted_p, 1, generator=generator)
        return int(order[pick])
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_batch(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """One token per row of ``logits`` (float [B, V]); row ``i`` uses ``params[i]`` and ``generators[i]``."""
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(generators):
        raise ValueError(
            f"sample_batch: logits {tuple(logits.shape)} for {len(params)} params and {len(generators)} generators"
        )
    out: list[int | None] = [None] * len(params)
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    if greedy_rows:
        # one argmax for all greedy rows (and one device->host copy)
        idx = torch.tensor(greedy_rows, device=logits.device)
        for i, tok in zip(greedy_rows, torch.argmax(logits.index_select(0, idx), dim=-1).tolist()):
            out[i] = tok
    for i, p in enumerate(params):
        if out[i] is None:
            out[i] = sample_row(logits[i], p, generators[i])
    return out  # type: ignore[return-value]
