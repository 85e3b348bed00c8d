"""The OpenAI chat-completions wire format: request validation, response bodies and SSE chunks."""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deploy.engines import Delta


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


def _utf8(text: str) -> str:
    """JSON may carry a lone surrogate ("\\ud800") that no tokenizer can encode: refuse it here,
    as a 400 that names the field, not as a 500 from deep in the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"holds a character that is not valid Unicode ({exc.reason} at "
                         f"position {exc.start})") from None
    return text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. `name`, which changes nothing here

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]

    @field_validator("content")
    @classmethod
    def _valid_text(cls, value):
        for text in [value] if isinstance(value, str) else [p.text for p in value]:
            _utf8(text)
        return value

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(
            p.text for p in self.content
        )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # Unknown fields are refused: a misspelt `max_token` silently ignored is worse than a 400.
    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # a 64-bit integer, as OpenAI's
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is served.")
    user: str | None = None  # for the client's own tracking; changes nothing
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)  # vLLM's and LMDeploy's extra
    # Fields an engine may not implement: set to anything but their neutral value, they are
    # served where the engine can and refused with a 400 naming them where it cannot.
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: dict[str, float] | None = None
    response_format: dict | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None

    def features(self) -> list[str]:
        """The optional features this request asks for, by the field that asks."""
        wanted = {
            "presence_penalty": bool(self.presence_penalty),
            "frequency_penalty": bool(self.frequency_penalty),
            "repetition_penalty": self.repetition_penalty not in (None, 1.0),
            "logprobs": bool(self.logprobs or self.top_logprobs),
            "logit_bias": bool(self.logit_bias),
            "response_format": bool(self.response_format)
            and self.response_format.get("type") != "text",
            "tools": bool(self.tools) or self.tool_choice not in (None, "none"),
        }
        return [name for name, asked in wanted.items() if asked]

    @field_validator("stop")
    @classmethod
    def _valid_stops(cls, value):
        for text in [value] if isinstance(value, str) else value or []:
            _utf8(text)
        return value

    def plain_messages(self) -> list[dict[str, str]]:
        # "developer" is the newer OpenAI name for the system role; chat templates know "system".
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]

    def stops(self) -> tuple[str, ...] | None:
        if self.stop is None:
            return None
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(delta: Delta) -> dict:
    return {
        "prompt_tokens": delta.prompt_tokens,
        "completion_tokens": delta.completion_tokens,
        "total_tokens": delta.prompt_tokens + delta.completion_tokens,
    }


def completion_body(completion_id: str, model: str, answer: Delta) -> dict:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": answer.text},
            "finish_reason": answer.finish_reason,
        }],
        "usage": usage(answer),
    }


def sse_chunk(completion_id: str, model: str, created: int, delta: dict,
              finish_reason: str | None = None, usage_body: dict | None = None,
              choices: bool = True) -> str:
    """One `data:` event of a streamed completion, framed as OpenAI frames it."""
    body = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}] if choices else [],
    }
    if usage_body is not None:
        body["usage"] = usage_body
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def content_chunk_framer(completion_id: str, model: str, created: int):
    """A function text -> the `data:` event of a content delta, equal to sse_chunk's. Only the text
    changes between a stream's content chunks, so the rest is serialised once per stream: this
    runs once per generated token."""
    head, tail = sse_chunk(completion_id, model, created, {"content": "\x00"}).rsplit('"\\u0000"', 1)

    def frame(text: str) -> str:
        return head + json.dumps(text, ensure_ascii=False) + tail

    return frame


SSE_DONE = "data: [DONE]\n\n"
