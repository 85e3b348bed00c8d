"""The one small interface every engine implements.

The server, UI, terminal chat, memory report and benchmark see only this. It is async and
per-request streaming so that an engine with continuous batching (LMDeploy) can serve many
requests at once, while a simple engine (transformers) may queue them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from deploy.engines.chat_format import Message, encode_chat

# The file hqq's save_quantized writes: its presence marks a folder of HQQ 4-bit weights, which the
# builder makes (deploy/builder/quantize.py) and the transformers engine loads.
HQQ_MARKER = "qmodel.pt"


class PromptTooLongError(ValueError):
    """The prompt does not leave room for an answer inside the engine's session length."""

    def __init__(self, prompt_tokens: int, session_len: int):
        self.prompt_tokens = prompt_tokens
        self.session_len = session_len
        super().__init__(
            f"The prompt has {prompt_tokens} tokens but engine.session_len is {session_len}: "
            "shorten the conversation or raise engine.session_len in the recipe."
        )


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 512
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # OpenAI's: subtract penalty x count (frequency) or penalty once (presence) from the logits of
    # tokens already generated. HF's: divide positive logits of any token already seen (prompt
    # included) by repetition_penalty, multiply negative ones.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # None: no log probabilities; k >= 0: each generated token's, with the k likeliest others.
    logprobs: int | None = None
    # OpenAI's response_format (json_object or json_schema), for engines with guided decoding;
    # also an xgrammar structural tag (serve/openai/tool_calls.py forces tool calls with one).
    response_format: dict | None = None
    # Keep special tokens in the text: some models mark tool calls with them (InternLM2's
    # <|action_start|>), and the server must see the marks to read the calls.
    keep_special_tokens: bool = False

    def non_default(self) -> set[str]:
        """The optional settings this request changes from their neutral values."""
        neutral = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                   "logprobs": None, "response_format": None}
        return {name for name, value in neutral.items() if getattr(self, name) != value}


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log probability under the model (before penalties and temperature),
    and the `top` likeliest tokens at that position as (token id, log probability)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Delta:
    """One piece of a streamed answer. The last one has finish_reason set and the token counts.
    `logprobs` holds the tokens generated since the previous piece, where they were asked for."""

    text: str = ""
    finish_reason: Literal["stop", "length"] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None


@dataclass
class EngineMemory:
    """What the engine knows about its own memory; None where it cannot tell."""

    device: str
    weight_bytes: int | None = None
    kv_bytes_per_token: int | None = None
    kv_cache_bytes: int | None = None
    kv_capacity_tokens: int | None = None
    kv_block_size: int | None = None
    kv_blocks: int | None = None
    sessions_that_fit: int | None = None
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # the engine settings behind these numbers

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class EngineActivity:
    """What the engine is doing now: sequences decoding, sequences queued inside it, and the share
    of its KV cache in use where it has a fixed one."""

    running: int
    waiting: int
    kv_usage: float | None = None


class Engine(ABC):
    """A loaded model that streams answers: to a chat (the chat template applied) or to raw text."""

    name: str  # e.g. "transformers", "lmdeploy-pytorch"
    session_len: int
    model_config: dict  # the model's config.json, for the memory prediction
    tokenizer: Any  # a Hugging Face tokenizer: the kit renders every prompt itself
    # Optional GenerationParams settings the engine implements; the server refuses the others
    # with a 400 that names them, never ignoring them.
    supports: frozenset[str] = frozenset()

    @abstractmethod
    def stream_tokens(self, prompt: list[int], params: GenerationParams) -> AsyncIterator[Delta]:
        """Stream the continuation of the token ids `prompt`. Closing the iterator early cancels
        the request."""

    @abstractmethod
    def memory(self) -> EngineMemory:
        """The engine's own view of its memory."""

    def encode(self, messages: list[Message]) -> list[int]:
        """The token ids of `messages` rendered by the chat template, ready for an answer."""
        return encode_chat(self.tokenizer, messages)

    def encode_text(self, text: str) -> list[int]:
        """The token ids of raw text, with the tokenizer's own special tokens (a BOS, say)."""
        return self.tokenizer(text)["input_ids"]

    def stream_chat(self, messages: list[Message], params: GenerationParams) -> AsyncIterator[Delta]:
        """Stream the answer to `messages`. Closing the iterator early cancels the request."""
        return self.stream_tokens(self.encode(messages), params)

    def count_tokens(self, messages: list[Message]) -> int:
        """Tokens of the prompt that `messages` renders to, chat template included."""
        return len(self.encode(messages))

    async def activity(self) -> EngineActivity | None:
        """Running and waiting sequences now, for /metrics; None where the engine cannot tell."""
        return None

    async def prompt_logits(self, token_ids: list[list[int]]) -> list:
        """Next-token logits (a float tensor [len, vocab]) at every position of each sequence, for
        quality comparisons between settings (the builder's gate, the benchmark)."""
        raise NotImplementedError(f"{self.name} cannot return logits")

    def close(self) -> None:  # noqa: B027 - optional for engines holding nothing to free
        """Free the model; the engine is unusable afterwards."""

    async def chat(self, messages: list[Message], params: GenerationParams) -> Delta:
        """The whole answer at once: the streamed pieces joined, with the final counts."""
        return await joined(self.stream_chat(messages, params))


async def joined(stream: AsyncIterator[Delta]) -> Delta:
    """A stream's pieces joined into one Delta, with the last one's finish reason and counts."""
    pieces: list[str] = []
    scores: list[TokenLogprob] | None = None
    last = Delta()
    async for delta in stream:
        pieces.append(delta.text)
        if delta.logprobs is not None:
            scores = (scores or []) + delta.logprobs
        last = delta
    return Delta("".join(pieces), last.finish_reason, last.prompt_tokens, last.completion_tokens,
                 scores)


class StopMatcher:
    """Cuts a stream of text at the first stop string, holding back text that may begin one.

    Engines stream text in arbitrary pieces, so a stop string can straddle two pieces; the
    matcher keeps back at most len(longest stop) - 1 characters until it knows.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped or not self.stops:
            return "" if self.stopped else text
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        # Hold back the longest tail that could still grow into a stop string.
        longest = max(len(s) for s in self.stops) - 1
        hold = next(
            (k for k in range(min(len(self.pending), longest), 0, -1)
             if any(s.startswith(self.pending[-k:]) for s in self.stops)),
            0,
        )
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return "" if self.stopped else out
