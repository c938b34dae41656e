"""The embedded engine: :class:`~llmquant.serving.core.EngineCore` in a background thread, with an
async API for the server.

* :meth:`Engine.submit_async` (call it on the event loop) returns a :class:`RequestHandle`; iterate
  it (``async for event in handle``) to receive :class:`~llmquant.serving.core.Event` objects; the
  last one has ``finish_reason`` set. ``handle.cancel()`` (e.g. on client disconnect) makes the
  engine drop the request before its next step, freeing its batch row.
* The queue of requests waiting for a batch row is bounded (``max_queue``): a submit that would
  exceed it raises :class:`QueueFullError` at once (the server answers 429).
* :meth:`Engine.submit` is the same for any thread, with a plain callable as the sink.

Example::

    engine = Engine(model, tokenizer, max_batch=16, max_queue=64).start()
    handle = engine.submit_async(tokenizer.encode("Hello"), SamplingParams(max_tokens=8))
    async for ev in handle:
        print(ev.text, end="")
    engine.shutdown()
"""
from __future__ import annotations

import asyncio
import copy
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from torch import nn

from llmquant.serving.core import EngineCore, Event, Request
from llmquant.serving.sampling import SamplingParams

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The bounded waiting queue is full; retry later."""


class EngineClosedError(RuntimeError):
    """The engine has been shut down (or was never started)."""


class RequestHandle:
    """One request seen from the event loop: an async iterator of its events."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self.request: Request | None = None
        self.done = False

    def _sink(self, ev: Event) -> None:  # engine thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, ev)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            logger.debug("dropping event for %s: event loop closed", ev.request_id)

    @property
    def id(self) -> str:
        return self.request.id

    def cancel(self) -> None:
        if not self.done and self.request is not None:
            self._engine.cancel(self.request)

    async def __aiter__(self) -> AsyncIterator[Event]:
        while not self.done:
            ev = await self._queue.get()
            if ev.finish_reason is not None:
                self.done = True
            yield ev


class Engine:
    """Continuous-batching generation in a background thread (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        max_model_len: int | None = None,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        # the engine thread decodes with its own tokenizer copy: a fast tokenizer must not be used
        # from two threads at once, and the server encodes prompts on the event loop thread
        self.core = EngineCore(model, copy.deepcopy(tokenizer), max_batch=max_batch, max_model_len=max_model_len)
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._incoming: list[Request] = []
        self._thread: threading.Thread | None = None
        self._stop = False
        self.error: BaseException | None = None

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._run, name="llmquant-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("engine thread did not stop within %.1f s", timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def max_batch(self) -> int:
        return self.core.max_batch

    # --- requests -------------------------------------------------------------------------------
    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError when the request cannot run (prompt or max_tokens too long, ...)."""
        self.core.check(prompt_ids, params)

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        sink: Callable[[Event], None],
        request_id: str | None = None,
    ) -> Request:
        """Queue a request from any thread; ``sink`` is called from the engine thread with each event."""
        self.core.check(prompt_ids, params)
        req = Request(prompt_ids, params, sink, request_id)
        with self._cond:
            if not self.alive:
                raise EngineClosedError("the engine is not running")
            if self.num_waiting() >= self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting)")
            self._incoming.append(req)
            self._cond.notify_all()
        return req

    def submit_async(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestHandle:
        """Queue a request from the running event loop; iterate the handle for its events."""
        handle = RequestHandle(self, asyncio.get_running_loop())
        handle.request = self.submit(prompt_ids, params, handle._sink, request_id)
        return handle

    def cancel(self, req: Request) -> None:
        req.cancel()
        with self._cond:
            self._cond.notify_all()

    # --- introspection --------------------------------------------------------------------------
    def num_waiting(self) -> int:
        return len(self._incoming) + len(self.core.waiting)

    def num_running(self) -> int:
        return len(self.core.running)

    def stats(self) -> dict[str, int]:
        b = self.core.batch
        return {
            "waiting": self.num_waiting(),
            "running": self.num_running(),
            "batch_rows": b.size,
            "kv_columns": b.length,
            "max_batch": self.core.max_batch,
            "max_queue": self.max_queue,
            "decode_steps": self.core.decode_steps,
            "prefills": self.core.prefills,
            "generated_tokens": self.core.generated_tokens,
            "peak_running": self.core.peak_running,
        }

    # --- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        core = self.core
        while True:
            with self._cond:
                while not self._stop and not self._incoming and not core.has_work():
                    self._cond.wait()
                if self._stop:
                    break
                incoming, self._incoming = self._incoming, []
            for req in incoming:
                try:
                    core.add(req)
                except ValueError as e:  # checked at submit already; the engine may have changed since
                    core._finish(req, "error", "", [], error=str(e))
            try:
                core.step()
            except Exception as e:  # keep serving: fail this batch, report, go on
                logger.exception("decode step failed; failing %d running requests", len(core.running))
                self.error = e
                core.fail_all(f"engine error: {type(e).__name__}: {e}")
        with self._cond:
            incoming, self._incoming = self._incoming, []
        for req in incoming:
            core._finish(req, "abort", "", [])
        core.abort_all()
