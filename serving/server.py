"""OpenAI-compatible HTTP server over the embedded :class:`~llmquant.serving.engine.Engine`.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
SSE streaming), ``GET /health``, ``GET /metrics`` (Prometheus). With an API key, every ``/v1`` route
needs ``Authorization: Bearer <key>`` (compared in constant time); ``/health`` and ``/metrics`` stay
open for probes and scrapers.

Every error is OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``:

====  ==========================================================================================
400   malformed JSON, body not UTF-8, invalid or unsupported parameter (``n > 1`` ...), prompt
      longer than the context, ``max_tokens`` out of range, chat without a chat template
401   missing or wrong API key
413   request body over 4 MiB
404   unknown model, unknown route
429   the engine's waiting queue is full
500   the engine failed on this request (the server keeps serving the others)
503   the engine is not running
====  ==========================================================================================

A client that disconnects (streaming or not) cancels its request; the engine frees its batch row
before the next decode step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmquant.serving.core import Event
from llmquant.serving.engine import (
    Engine,
    EngineClosedError,
    QueueFullError,
    RequestHandle,
)
from llmquant.serving.metrics import ServerMetrics
from llmquant.serving.protocol import APIError, ChatCompletionRequest, CompletionRequest
from llmquant.serving.sampling import SamplingParams

logger = logging.getLogger(__name__)

#: OpenAI's default for /v1/completions; chat defaults to the rest of the context
COMPLETION_DEFAULT_MAX_TOKENS = 16
#: larger bodies are refused (413) before they are decoded or tokenized on the event loop
MAX_BODY_BYTES = 4 * 1024 * 1024
_ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _wait_disconnect(request: Request) -> None:
    # After the body is read, the next ASGI message is http.disconnect (or the server's own end).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _CountRequests:
    """Pure ASGI middleware counting responses by endpoint and status (streaming-safe)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in _ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()


class OpenAIServer:
    """The routes' shared state: engine, tokenizer, served name, key, metrics."""

    def __init__(self, engine: Engine, tokenizer: Any, model_name: str, api_key: str | None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self._key = api_key.encode("utf-8") if api_key else None
        self.metrics = ServerMetrics(engine)
        self.created = int(time.time())

    # --- request checks -------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self._key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8"), self._key):
            raise APIError(401, "Incorrect or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    async def parse(self, request: Request, cls: type[BaseModel]) -> Any:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise APIError(413, f"request body of {int(declared)} bytes exceeds the limit of {MAX_BODY_BYTES}",
                           code="request_too_large")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"request body of {len(raw)} bytes exceeds the limit of {MAX_BODY_BYTES}",
                           code="request_too_large")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise APIError(400, f"request body is not valid UTF-8 (bad byte at offset {e.start})",
                           code="invalid_utf8") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise APIError(400, f"malformed JSON body: {e.msg} (line {e.lineno}, column {e.colno})",
                           code="invalid_json") from None
        if not isinstance(obj, dict):
            raise APIError(400, f"the body must be a JSON object, got {type(obj).__name__}", code="invalid_json")
        try:
            body = cls.model_validate(obj)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise APIError(400, f"{loc}: {err['msg']}", param=str(err["loc"][0]) if err["loc"] else None,
                           code="invalid_value") from None
        if body.model != self.model_name:
            raise APIError(404, f"The model `{body.model}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")
        for param, message in body.unsupported():
            raise APIError(400, message, param=param, code="unsupported_parameter")
        return body

    def sampling(
        self, body: Any, n_prompt: int, max_tokens: int | None, default_max: int, prompt_param: str
    ) -> SamplingParams:
        ctx = self.engine.max_model_len
        room = ctx - n_prompt
        if n_prompt == 0:
            raise APIError(400, "the prompt is empty (0 tokens)", param=prompt_param)
        if room <= 0:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens; the prompt has {n_prompt} "
                           "tokens, leaving no room to generate", param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(default_max, room)
        elif max_tokens > room:
            raise APIError(400, f"max_tokens={max_tokens} is too large: the prompt has {n_prompt} tokens and the "
                           f"context length is {ctx}, so at most {room}", param="max_tokens",
                           code="context_length_exceeded")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=body.stop_list(),
            ignore_eos=body.ignore_eos,
        )

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestHandle:
        try:
            return self.engine.submit_async(prompt_ids, params)
        except QueueFullError as e:
            raise APIError(429, f"{e}; retry later", type="rate_limit_error", code="queue_full") from None
        except EngineClosedError as e:
            raise APIError(503, str(e), type="server_error", code="engine_unavailable") from None
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None

    # --- prompts --------------------------------------------------------------------------------
    def completion_prompt(self, body: CompletionRequest) -> list[int]:
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], int):
            return list(p)
        if isinstance(p, list):
            p = p[0] if p else ""
        return list(self.tokenizer.encode(p)) if p else []

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, f"model `{self.model_name}` has no chat template; use /v1/completions",
                           param="messages", code="no_chat_template")
        messages = [m.as_template_dict() for m in body.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except jinja2.TemplateError as e:
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    # --- running a request ----------------------------------------------------------------------
    def record(self, endpoint: str, handle: RequestHandle, last: Event | None, t0: float) -> None:
        m, req = self.metrics, handle.request
        m.latency.labels(endpoint=endpoint).observe(time.perf_counter() - t0)
        m.prompt_tokens.inc(len(req.prompt_ids))
        m.generation_tokens.inc(len(req.output_ids))
        m.finished.labels(reason=last.finish_reason if last and last.finish_reason else "abort").inc()
        if req.first_token_time is not None:
            m.ttft.observe(req.first_token_time - req.arrival)

    async def collect(self, request: Request, handle: RequestHandle, endpoint: str) -> tuple[str, Event]:
        """Run a non-streaming request to the end; a client disconnect cancels it."""
        t0 = time.perf_counter()
        watcher = asyncio.ensure_future(_wait_disconnect(request))

        def on_disconnect(t: asyncio.Future) -> None:
            if not t.cancelled():
                if t.exception() is not None:
                    logger.debug("disconnect watcher failed: %r", t.exception())
                handle.cancel()

        watcher.add_done_callback(on_disconnect)
        parts, last = [], None
        try:
            async for ev in handle:
                parts.append(ev.text)
                last = ev
        finally:
            watcher.cancel()
            handle.cancel()
            self.record(endpoint, handle, last, t0)
        if last.finish_reason == "error":
            raise APIError(500, last.error or "generation failed", type="server_error", code="engine_error")
        return "".join(parts), last

    async def stream(
        self, handle: RequestHandle, endpoint: str, chunk: Callable[[str | None, str | None], dict],
        usage_chunk: Callable[[Event], dict] | None, first: dict | None = None,
    ) -> AsyncIterator[str]:
        """SSE events for one request; cancelling the generator (client gone) cancels the request."""
        t0, last = time.perf_counter(), None
        try:
            if first is not None:
                yield _sse(first)
            async for ev in handle:
                last = ev
                if ev.finish_reason in ("error", "abort"):
                    err = APIError(500, ev.error or "the request was aborted", type="server_error",
                                   code="engine_error" if ev.finish_reason == "error" else "aborted")
                    yield _sse(err.body())
                    break
                if ev.text:
                    yield _sse(chunk(ev.text, None))
                if ev.finish_reason is not None:
                    yield _sse(chunk(None, ev.finish_reason))
                    if usage_chunk is not None:
                        yield _sse(usage_chunk(ev))
            yield "data: [DONE]\n\n"
        finally:
            handle.cancel()
            self.record(endpoint, handle, last, t0)


def _usage(ev: Event) -> dict[str, int]:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


def create_app(engine: Engine, tokenizer: Any, model_name: str, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``. The caller starts and stops the engine."""
    srv = OpenAIServer(engine, tokenizer, model_name, api_key)
    app = FastAPI(title="llmquant", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv
    app.add_middleware(_CountRequests, metrics=srv.metrics)
    sse_headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if e.status_code == 404 else None
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                     code=code).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped", **engine.stats()},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(srv.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": srv.created, "owned_by": "llmquant",
                "max_model_len": engine.max_model_len}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        srv.authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request) -> dict:
        srv.authorize(request)
        if name != model_name:
            raise APIError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        srv.authorize(request)
        body: CompletionRequest = await srv.parse(request, CompletionRequest)
        ids = await asyncio.to_thread(srv.completion_prompt, body)  # tokenizing off the event loop
        params = srv.sampling(body, len(ids), body.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, "prompt")
        handle = srv.submit(ids, params)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)

        def chunk(text: str | None, finish: str | None) -> dict:
            out = {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                   "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}
            if include_usage:  # as OpenAI's: every chunk has the key, null until the final usage chunk
                out["usage"] = None
            return out

        if body.stream:

            def usage_chunk(ev: Event) -> dict:
                return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                        "choices": [], "usage": _usage(ev)}

            return StreamingResponse(
                srv.stream(handle, "/v1/completions", chunk, usage_chunk if include_usage else None),
                media_type="text/event-stream", headers=sse_headers,
            )
        text, last = await srv.collect(request, handle, "/v1/completions")
        out = chunk(text, last.finish_reason)
        out["usage"] = _usage(last)
        return JSONResponse(out)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        srv.authorize(request)
        body: ChatCompletionRequest = await srv.parse(request, ChatCompletionRequest)
        ids = await asyncio.to_thread(srv.chat_prompt, body)  # templating and tokenizing off the event loop
        params = srv.sampling(body, len(ids), body.requested_max_tokens(), engine.max_model_len, "messages")
        handle = srv.submit(ids, params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)

        def chunk(text: str | None, finish: str | None, role: str | None = None) -> dict:
            delta: dict[str, str] = {}
            if role is not None:
                delta["role"] = role
            if text is not None:
                delta["content"] = text
            out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if include_usage:  # as OpenAI's: every chunk has the key, null until the final usage chunk
                out["usage"] = None
            return out

        if body.stream:

            def usage_chunk(ev: Event) -> dict:
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                        "choices": [], "usage": _usage(ev)}

            return StreamingResponse(
                srv.stream(handle, "/v1/chat/completions", chunk, usage_chunk if include_usage else None,
                           first=chunk("", None, role="assistant")),
                media_type="text/event-stream", headers=sse_headers,
            )
        text, last = await srv.collect(request, handle, "/v1/chat/completions")
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": last.finish_reason}],
            "usage": _usage(last),
        })

    return app
