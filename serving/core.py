"""The synchronous heart of the embedded engine: continuous batching over any HF causal LM.

One :meth:`EngineCore.step` does, in order:

1. drop cancelled requests (waiting or running; a running one's batch row is freed at once);
2. admit waiting requests while the batch has free rows: prefill them together in one forward
   (prompts left-padded to the longest, at most ``max_prefill_tokens`` padded tokens per forward),
   sample each one's first token, and stack their KV caches into the running batch (:mod:`.kv_batch`);
3. one batched decode step for every running request: each row feeds its last token at its own
   position, and samples with its own params and generator (:mod:`.sampling`).

Requests join and leave between steps; finished rows are removed right after the step that finished
them. Results go out as :class:`Event` objects through each request's ``sink`` callable, one event per
generated token (the last one carries ``finish_reason``). The model is just a torch module: float or
llmquant-quantized (``QuantLinear`` layers) makes no difference here.

Not thread-safe: the threaded :class:`~llmquant.serving.engine.Engine` drives it from one thread.
"""
from __future__ import annotations

import inspect
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llmquant.serving.detok import StreamText
from llmquant.serving.kv_batch import PaddedKVBatch, new_cache
from llmquant.serving.sampling import SamplingParams, make_generator, sample_batch

logger = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclass
class Event:
    """What a request's consumer receives: the new text and tokens since the previous event."""

    request_id: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None  # one of FINISH_REASONS on the last event
    error: str | None = None
    time: float = field(default_factory=time.perf_counter)


_ids = itertools.count()


class Request:
    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        sink: Callable[[Event], None],
        request_id: str | None = None,
    ) -> None:
        self.id = request_id or f"req-{next(_ids)}"
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sink = sink
        self.output_ids: list[int] = []
        self.cancelled = False  # set from any thread; read by the engine between steps
        self.finish_reason: str | None = None
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self.stream: StreamText | None = None
        self.generator: torch.Generator | None = None

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def context_length(model: nn.Module) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        n = getattr(cfg, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    raise ValueError(f"cannot tell the context length of {type(model).__name__}: pass max_model_len")


def eos_token_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return ids


class EngineCore:
    """Continuous batching over ``model``; see the module docstring for one step's anatomy.

    ``tokenizer`` is used only to decode outputs (give the engine its own copy when another thread
    encodes with the same tokenizer: HF fast tokenizers are not safe to share across threads).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        max_batch: int = 16,
        max_model_len: int | None = None,
        eos_ids: set[int] | None = None,
        max_prefill_tokens: int = 4096,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(itertools.chain(model.parameters(), model.buffers())).device
        emb = model.get_input_embeddings()
        n = getattr(emb, "num_embeddings", None)  # nn.Embedding, or llmquant's QuantEmbedding
        self.vocab_size = int(n) if isinstance(n, int) else None
        self.max_batch = max_batch
        #: padded tokens (rows x longest prompt) one batched prefill may take; a longer prompt runs alone
        self.max_prefill_tokens = max_prefill_tokens
        self.max_model_len = max_model_len or context_length(model)
        self.eos_ids = eos_token_ids(model, tokenizer) if eos_ids is None else set(eos_ids)
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # row i of the batch is running[i]
        self.batch = PaddedKVBatch()
        self.decode_steps = 0
        self.prefills = 0  # prefill forward passes (each may take several requests)
        self.generated_tokens = 0
        self.peak_running = 0  # most rows the batch has held at once

    # --- admission ------------------------------------------------------------------------------
    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError (naming the sizes) when a request cannot run on this engine."""
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty (0 tokens)")
        if n >= self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens; the context length is {self.max_model_len}")
        if n + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = {n + params.max_tokens} exceeds "
                f"the context length {self.max_model_len}"
            )
        if self.vocab_size is not None:
            bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")

    def add(self, req: Request) -> None:
        self.check(req.prompt_ids, req.params)
        req.stream = StreamText(self.tokenizer, req.params.stop)
        req.generator = None if req.params.greedy else make_generator(req.params.seed, self.device)
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        self._drop_cancelled()
        self._admit()
        if self.running:
            self._decode()

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(req)
            self._finish(req, "abort", "", [])
        if any(r.cancelled for r in self.running):
            keep = [i for i, r in enumerate(self.running) if not r.cancelled]
            for r in self.running:
                if r.cancelled:
                    self._finish(r, "abort", "", [])
            self.running = [self.running[i] for i in keep]
            self.batch.keep(keep)

    def _admit(self) -> None:
        """Prefill waiting requests into free rows, several at once (left-padded) within the budget."""
        while self.waiting and len(self.running) < self.max_batch:
            group = [self.waiting.popleft()]
            longest = len(group[0].prompt_ids)
            while self.waiting and len(self.running) + len(group) < self.max_batch:
                n = max(longest, len(self.waiting[0].prompt_ids))
                if n * (len(group) + 1) > self.max_prefill_tokens:
                    break
                group.append(self.waiting.popleft())
                longest = n
            self._prefill(group)

    def _prefill(self, group: list[Request]) -> None:
        # input_ids / mask: [P, T], each prompt right-aligned (left padding); positions count real tokens
        p, t = len(group), max(len(r.prompt_ids) for r in group)
        ids = torch.zeros(p, t, dtype=torch.long)
        mask = torch.zeros(p, t, dtype=torch.long)
        for i, r in enumerate(group):
            ids[i, t - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, t - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        padded = bool((mask == 0).any())
        kwargs = {"logits_to_keep": 1} if self._logits_to_keep else {}
        cache = new_cache()
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=mask if padded else None,
                position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0),
                past_key_values=cache,
                use_cache=True,
                **kwargs,
            )
            tokens = sample_batch(out.logits[:, -1, :], [r.params for r in group], [r.generator for r in group])
        except (RuntimeError, ValueError, IndexError) as e:  # these requests only; the batch is untouched
            logger.exception("prefill failed for %d requests (%d x %d tokens)", p, p, t)
            for r in group:
                self._finish(r, "error", "", [], error=f"prefill failed: {e}")
            return
        self.prefills += 1
        first_row = len(self.running)
        self.batch.add(cache, mask)
        self.running.extend(group)
        self.peak_running = max(self.peak_running, len(self.running))
        done = {first_row + i for i, (r, tok) in enumerate(zip(group, tokens)) if self._accept(r, tok)}
        if done:
            keep = [i for i in range(len(self.running)) if i not in done]
            self.running = [self.running[i] for i in keep]
            self.batch.keep(keep)

    def _decode(self) -> None:
        mask, positions = self.batch.step_inputs()
        last = torch.tensor([[r.output_ids[-1]] for r in self.running], dtype=torch.long, device=self.device)
        out = self.model(
            input_ids=last,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.batch.cache,
            use_cache=True,
        )
        self.batch.advance(mask)
        self.decode_steps += 1
        tokens = sample_batch(
            out.logits[:, -1, :], [r.params for r in self.running], [r.generator for r in self.running]
        )
        keep = [i for i, (r, t) in enumerate(zip(self.running, tokens)) if not self._accept(r, t)]
        self.running = [self.running[i] for i in keep]
        self.batch.keep(keep)

    # --- results --------------------------------------------------------------------------------
    def _accept(self, req: Request, token: int) -> bool:
        """Record one sampled token, emit its event; True when the request is finished."""
        req.output_ids.append(token)
        self.generated_tokens += 1
        if req.first_token_time is None:
            req.first_token_time = time.perf_counter()
        p = req.params
        if token in self.eos_ids and not p.ignore_eos:
            self._finish(req, "stop", req.stream.finish(), [token])
            return True
        text = req.stream.push(token)
        if req.stream.stopped:
            self._finish(req, "stop", text, [token])
            return True
        if len(req.output_ids) >= p.max_tokens or len(req.prompt_ids) + len(req.output_ids) >= self.max_model_len:
            self._finish(req, "length", text + req.stream.finish(), [token])
            return True
        self._emit(req, Event(req.id, text, [token], len(req.prompt_ids), len(req.output_ids)))
        return False

    def _finish(self, req: Request, reason: str, text: str, tokens: list[int], error: str | None = None) -> None:
        req.finish_reason = reason
        ev = Event(req.id, text, tokens, len(req.prompt_ids), len(req.output_ids), finish_reason=reason, error=error)
        self._emit(req, ev)

    def _emit(self, req: Request, ev: Event) -> None:
        req.sink(ev)

    def fail_all(self, message: str) -> None:
        """A step failed in a way that may have corrupted the batch: end every request with an error."""
        for req in list(self.running) + list(self.waiting):
            self._finish(req, "error", "", [], error=message)
        self.running, self.waiting = [], deque()
        self.batch.keep([])

    def abort_all(self) -> None:
        for req in list(self.running) + list(self.waiting):
            self._finish(req, "abort", "", [])
        self.running, self.waiting = [], deque()
        self.batch.keep([])
