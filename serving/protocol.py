"""OpenAI-compatible request bodies (pydantic) and the OpenAI error shape.

Only what the embedded engine can honour is accepted with a non-default value: ``n``, ``best_of``,
``logprobs``, ``echo``, ``suffix``, penalties, ``logit_bias``, ``response_format`` (JSON mode and JSON
schemas), tools and functions (``tools``, ``tool_choice``, ``functions``, ``function_call``,
``parallel_tool_calls``), and non-text modalities (``audio``, ``modalities``, ``web_search_options``)
are accepted at their neutral value (clients send them) and rejected with a 400 naming the parameter
otherwise: a client that asked for JSON or a tool call must not get free text with a 200. Fields
outside the OpenAI API are ignored, as the OpenAI servers of other projects do. Every string must be encodable as UTF-8 (a JSON
``"\\ud800"`` escape decodes to a lone surrogate that no tokenizer can take).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from llmquant.serving.sampling import SEED_MAX, SEED_MIN

MAX_STOP = 4


class APIError(Exception):
    """An error to answer with ``{"error": {"message", "type", "param", "code"}}`` and ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _utf8(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"string is not valid UTF-8 (lone surrogate at index {e.start})") from None
    return s


Text = Annotated[str, AfterValidator(_utf8)]
StopText = Annotated[str, Field(min_length=1), AfterValidator(_utf8)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: StopText | list[StopText] | None = Field(default=None)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: Text | None = None
    response_format: ResponseFormat | None = None
    #: extension (as in vLLM): keep generating past end-of-sequence tokens, for benchmarks
    ignore_eos: bool = False

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def unsupported(self) -> list[tuple[str, str]]:
        """(param, message) for every requested feature this server does not implement."""
        out = []
        if (self.n or 1) != 1:
            out.append(("n", f"n={self.n} is not supported: only n=1"))
        if len(self.stop_list()) > MAX_STOP:
            out.append(("stop", f"at most {MAX_STOP} stop sequences, got {len(self.stop_list())}"))
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                out.append((name, f"{name} is not supported (must be 0)"))
        if self.logit_bias:
            out.append(("logit_bias", "logit_bias is not supported"))
        if self.response_format is not None and self.response_format.type != "text":
            out.append(("response_format", f"response_format type {self.response_format.type!r} is not supported: "
                        "this server does not constrain output to JSON (only type 'text')"))
        return out


class CompletionRequest(_Body):
    prompt: Text | list[int] | list[Text]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: Text | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            out.append(("prompt", f"only one prompt per request, got a list of {len(self.prompt)}"))
        if self.echo:
            out.append(("echo", "echo is not supported"))
        if self.logprobs is not None:
            out.append(("logprobs", "logprobs are not supported"))
        if (self.best_of or 1) != 1:
            out.append(("best_of", "best_of > 1 is not supported"))
        if self.suffix:
            out.append(("suffix", "suffix is not supported"))
        return out


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def as_template_dict(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        # chat templates know "system"; "developer" is OpenAI's newer name for it
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    web_search_options: dict[str, Any] | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.logprobs or self.top_logprobs:
            out.append(("logprobs", "logprobs are not supported"))
        if self.tools:
            out.append(("tools", "tools are not supported"))
        # "none" means no tool call, and so does "auto" when no tool is offered
        if self.tool_choice not in (None, "none") and not (self.tool_choice == "auto" and not self.tools):
            out.append(("tool_choice", f"tool_choice={self.tool_choice!r} is not supported: no tool calls"))
        if self.parallel_tool_calls and self.tools:
            out.append(("parallel_tool_calls", "parallel_tool_calls is not supported: no tool calls"))
        if self.functions:
            out.append(("functions", "functions are not supported"))
        if self.function_call not in (None, "none") and not (self.function_call == "auto" and not self.functions):
            out.append(("function_call", f"function_call={self.function_call!r} is not supported: no function calls"))
        if self.audio is not None:
            out.append(("audio", "audio output is not supported"))
        if self.modalities is not None and list(self.modalities) != ["text"]:
            out.append(("modalities", f"modalities={self.modalities} is not supported: only ['text']"))
        if self.web_search_options is not None:
            out.append(("web_search_options", "web search is not supported"))
        return out

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

