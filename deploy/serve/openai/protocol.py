"""The OpenAI wire formats: chat completions and the legacy text completions. Request validation,
response bodies and SSE chunks."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deploy.engines import Delta, TokenLogprob


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

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # None only where an assistant message carries tool_calls instead, as OpenAI allows.
    content: str | list[_TextPart] | None = None
    tool_calls: list[dict] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # which call a tool message answers

    @field_validator("content")
    @classmethod
    def _valid_text(cls, value):
        if value is None:
            return value
        for text in [value] if isinstance(value, str) else [p.text for p in value]:
            _utf8(text)
        return value

    @model_validator(mode="after")
    def _content_or_calls(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant message with tool_calls may omit it)")
        return self

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """The fields both APIs share. Unknown fields are refused: a misspelt `max_token` silently
    ignored is worse than a 400."""

    model_config = ConfigDict(extra="forbid")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
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
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _valid_stops(cls, value):
        for text in [value] if isinstance(value, str) else value or []:
            _utf8(text)
        return value

    def stops(self) -> tuple[str, ...] | None:
        if self.stop is None:
            return None
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def logprob_count(self) -> int | None:
        """GenerationParams.logprobs: None for none, else how many alternatives per token."""
        return None

    def guided_format(self) -> dict | None:
        """The response_format the engine must follow; None for plain text."""
        return None

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def features(self) -> list[str]:
        """The optional features this request asks for, by the field that asks."""
        wanted = {
            "presence_penalty": bool(self.presence_penalty),
            "frequency_penalty": bool(self.frequency_penalty),
            "repetition_penalty": self.repetition_penalty not in (None, 1.0),
            "logprobs": self.logprob_count() is not None,
            "logit_bias": bool(self.logit_bias),
        }
        return [name for name, asked in wanted.items() if asked]


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @field_validator("response_format")
    @classmethod
    def _known_format(cls, value):
        kind = (value or {}).get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError(f"type {kind!r} is not one of text, json_object, json_schema")
        if kind == "json_schema" and not isinstance((value.get("json_schema") or {}).get("schema"),
                                                    dict):
            raise ValueError("json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}")
        return value

    def guided_format(self) -> dict | None:
        fmt = self.response_format
        return fmt if fmt and fmt.get("type", "text") != "text" else None

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def answer_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def features(self) -> list[str]:
        wanted = {
            "response_format": bool(self.response_format)
            and self.response_format.get("type") != "text",
            # tools with tool_choice "none" put nothing in play: any engine serves that.
            "tools": self.tool_choice != "none" and (bool(self.tools) or self.tool_choice is not None),
            # A required or named choice forces a call: guided decoding.
            "tool_choice": self.tool_choice == "required" or isinstance(self.tool_choice, dict),
        }
        return super().features() + [name for name, asked in wanted.items() if asked]

    def plain_messages(self) -> list[dict]:
        # "developer" is the newer OpenAI name for the system role; chat templates know "system".
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text(),
             **({"tool_calls": m.tool_calls} if m.tool_calls else {})}
            for m in self.messages
        ]

    def has_tool_history(self) -> bool:
        """Earlier calls or tool results in the conversation, which only a tool format renders."""
        return any(m.role == "tool" or m.tool_calls for m in self.messages)


class CompletionRequest(_GenerationRequest):
    """The legacy /v1/completions request: raw text continued as it is, no chat template."""

    prompt: str | list[str] = Field(description="One prompt (a list of one is accepted).")
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this API
    best_of: int | None = Field(None, ge=1, le=1, description="Only one candidate is generated.")
    echo: bool = False
    suffix: None = Field(None, description="Insertion (text after the completion) is not served.")
    logprobs: int | None = Field(None, ge=0, le=5)  # this API's: how many alternatives per token

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("give one prompt: a batch of prompts is not served, send them "
                                 "as separate requests")
            value = value[0]
        return _utf8(value)

    @model_validator(mode="after")
    def _no_echoed_logprobs(self):
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs would need the prompt's log probabilities, which "
                             "are not served: drop one of them")
        return self

    def logprob_count(self) -> int | None:
        return self.logprobs

    def answer_tokens(self) -> int | None:
        return self.max_tokens


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(delta: Delta) -> dict:
    return {
        "prompt_tokens": delta.prompt_tokens,
        "completion_tokens": delta.completion_tokens,
        "total_tokens": delta.prompt_tokens + delta.completion_tokens,
    }


class ChatFormat:
    """Chat completions as OpenAI frames them: a whole body, or SSE chunks of `chat.completion.chunk`.
    `token_text` turns a token id into its text, for log probabilities."""

    object_name, chunk_name, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, model: str, token_text: Callable[[int], str], echo: str = ""):
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.model, self.token_text, self.echo = model, token_text, echo
        self.created = int(time.time())
        self._offset = len(echo)  # text_offset of the next token, for the legacy logprobs

    def body(self, answer: Delta) -> dict:
        return {"id": self.id, "object": self.object_name, "created": self.created,
                "model": self.model, "choices": [self._choice(answer)], "usage": usage(answer)}

    def _choice(self, answer: Delta) -> dict:
        message = {"role": "assistant", "content": answer.text}
        calls = getattr(answer, "tool_calls", None)  # tool_calls.py's ToolDelta
        if calls:
            message = {"role": "assistant", "content": answer.text or None, "tool_calls": calls}
        return {"index": 0, "message": message,
                "logprobs": self.logprobs(answer.logprobs), "finish_reason": answer.finish_reason}

    def logprobs(self, scores: list[TokenLogprob] | None) -> dict | None:
        if scores is None:
            return None

        def entry(token: int, logprob: float) -> dict:
            text = self.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(s.token, s.logprob),
                             "top_logprobs": [entry(t, lp) for t, lp in s.top]} for s in scores]}

    # -- streaming ---------------------------------------------------------------------------

    def chunk(self, delta: dict | None, finish_reason: str | None = None,
              usage_body: dict | None = None, logprobs: dict | None = None) -> str:
        """One `data:` event; `delta` None makes the usage-only chunk, which has no choices."""
        body = {"id": self.id, "object": self.chunk_name, "created": self.created,
                "model": self.model,
                "choices": [] if delta is None else [self._chunk_choice(delta, finish_reason, logprobs)]}
        if usage_body is not None:
            body["usage"] = usage_body
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def _chunk_choice(self, delta: dict, finish_reason: str | None, logprobs: dict | None) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        if logprobs is not None:
            choice["logprobs"] = logprobs
        return choice

    def start(self) -> list[str]:
        return [self.chunk({"role": "assistant", "content": ""})]

    def content_framer(self) -> Callable[[str], str]:
        """A function text -> the `data:` event of a content delta, equal to `chunk`'s. Only the
        text changes between a stream's content chunks, so the rest is serialised once per stream:
        this runs once per generated token."""
        head, tail = self.chunk(self._text_delta("\x00")).rsplit('"\\u0000"', 1)

        def frame(text: str) -> str:
            return head + json.dumps(text, ensure_ascii=False) + tail

        return frame

    def _text_delta(self, text: str) -> dict:
        return {"content": text}

    def piece(self, delta: Delta) -> str:
        return self.chunk(self._text_delta(delta.text), logprobs=self.logprobs(delta.logprobs))

    def tool_calls(self, calls: list[dict]) -> str:
        """The calls of a whole answer as one delta, each with its index, as OpenAI streams them."""
        return self.chunk({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})

    def end(self, last: Delta, include_usage: bool) -> list[str]:
        events = [self.chunk({}, last.finish_reason)]
        if include_usage:
            events.append(self.chunk(None, usage_body=usage(last)))
        return events


class TextFormat(ChatFormat):
    """The legacy text completions: `text_completion` objects, text in `choices[0].text`, and
    log probabilities as tokens, token_logprobs, top_logprobs and text_offset."""

    # The legacy stream's chunks are `text_completion` objects too.
    object_name, chunk_name, id_prefix = "text_completion", "text_completion", "cmpl"

    def _choice(self, answer: Delta) -> dict:
        return {"index": 0, "text": self.echo + answer.text,
                "logprobs": self.logprobs(answer.logprobs), "finish_reason": answer.finish_reason}

    def logprobs(self, scores: list[TokenLogprob] | None) -> dict | None:
        if scores is None:
            return None
        tokens = [self.token_text(s.token) for s in scores]
        offsets = []
        for text in tokens:
            offsets.append(self._offset)
            self._offset += len(text)
        return {"tokens": tokens, "token_logprobs": [s.logprob for s in scores],
                "top_logprobs": [{self.token_text(t): lp for t, lp in s.top} for s in scores],
                "text_offset": offsets}

    def _chunk_choice(self, delta: dict, finish_reason: str | None, logprobs: dict | None) -> dict:
        return {"index": 0, "text": delta.get("text", ""), "logprobs": logprobs,
                "finish_reason": finish_reason}

    def _text_delta(self, text: str) -> dict:
        return {"text": text}

    def start(self) -> list[str]:
        return [self.chunk(self._text_delta(self.echo))] if self.echo else []


SSE_DONE = "data: [DONE]\n\n"
