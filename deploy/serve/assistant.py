"""An assistant: a recipe's engine plus its serving settings (a `ServeConfig`). The kit's Python API.

The server, the Gradio UI, the terminal chat and the benchmark all talk to this (its async
methods), so the system prompt and the default answer length are applied in one place, whatever
engine runs underneath. Scripts use the sync methods:

    with Assistant.from_recipe("recipes/smollm2-cpu.yaml") as bot:
        print(bot.chat("Who are you?"))
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from deploy.engines import Delta, Engine, GenerationParams, Message
from deploy.serve.config import ServeConfig, load_model

if TYPE_CHECKING:
    from deploy.recipe import Recipe

log = logging.getLogger(__name__)

MIN_TEMPERATURE = 1e-5  # below this a temperature is served as greedy decoding


class Assistant:
    def __init__(self, config: ServeConfig, engine: Engine, memory: Callable[[], dict] | None = None):
        self.config = config
        self.engine = engine
        self._memory = memory
        self._sync_loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_recipe(cls, recipe: Recipe | str | Path, *, force: bool = False) -> Assistant:
        """The recipe's built model on its engine. Quantized weights must have passed the
        builder's quality gate; `force=True` loads them anyway, with a warning."""
        return cls(*load_model(recipe, force=force))

    def params(self, **overrides) -> GenerationParams:
        """Generation settings: the recipe's defaults with the caller's non-None overrides."""
        given = {k: v for k, v in overrides.items() if v is not None}
        given.setdefault("max_tokens", self.config.max_tokens)
        if "stop" in given:
            given["stop"] = tuple(given["stop"])
        if 0 < given.get("temperature", 0) < MIN_TEMPERATURE:
            # Logits divided by 1e-40 overflow to inf and sampling fails; this close to 0, the
            # distribution is the argmax anyway.
            given["temperature"] = 0.0
        return GenerationParams(**given)

    def cannot_fit(self, texts: list[str]) -> bool:
        """True when the prompt's texts are so long that no tokenization fits the session, known
        without tokenizing (which for a 1 MiB prompt costs seconds): no token of the vocabulary
        spells more than `max_token_bytes` bytes."""
        size = sum(len(text.encode()) for text in texts)
        return size > self.engine.session_len * self.max_token_bytes

    def token_text(self, token: int) -> str:
        """A token's text, as the API reports it with log probabilities."""
        return self.engine.tokenizer.decode([token])

    @functools.cached_property
    def max_token_bytes(self) -> int:
        # Token strings as the vocabulary spells them (byte-level 'Ġ', SentencePiece '▁' and
        # '<0x41>') are at least as long in UTF-8 as the bytes they stand for: an upper bound.
        return max((len(t.encode()) for t in self.engine.tokenizer.get_vocab()), default=1)

    def messages(self, messages: list[Message]) -> list[Message]:
        """The conversation as the engine sees it: the recipe's system prompt first if it has one."""
        system = self.config.system_prompt
        if system and not (messages and messages[0]["role"] == "system"):
            return [{"role": "system", "content": system}, *messages]
        return list(messages)

    # -- async: the server, the UI and the benchmark use these ---------------------------------

    def astream(self, messages: list[Message], params: GenerationParams | None = None,
                **overrides) -> AsyncIterator[Delta]:
        """Stream the answer to OpenAI-style `messages` as Deltas; the last holds the counts."""
        return self.engine.stream_chat(self.messages(messages), params or self.params(**overrides))

    async def achat(self, messages: list[Message], params: GenerationParams | None = None,
                    **overrides) -> Delta:
        """The whole answer to `messages`, with its finish reason and token counts."""
        return await self.engine.chat(self.messages(messages), params or self.params(**overrides))

    # -- sync: for scripts and notebooks -------------------------------------------------------

    def chat(self, conversation: str | list[Message], **overrides) -> str:
        """The answer to a prompt or to OpenAI-style messages, e.g. chat("Hi", max_tokens=64)."""
        return self._run(self.achat(_as_messages(conversation), **overrides)).text

    def chat_many(self, conversations: list[str | list[Message]], **overrides) -> list[str]:
        """Several answers in one call, sent together so that a batching engine batches them."""

        async def together():
            return await asyncio.gather(*(self.achat(_as_messages(c), **overrides)
                                          for c in conversations))

        return [answer.text for answer in self._run(together())]

    def stream(self, conversation: str | list[Message], **overrides) -> Iterator[str]:
        """The answer piece by piece, as the engine produces it."""
        pieces: queue.Queue = queue.Queue()

        async def produce():
            try:
                async for delta in self.astream(_as_messages(conversation), **overrides):
                    if delta.text:
                        pieces.put(delta.text)
            finally:
                pieces.put(None)

        future = asyncio.run_coroutine_threadsafe(produce(), self._loop())
        while (piece := pieces.get()) is not None:
            yield piece
        future.result()  # re-raise what went wrong, if anything did

    def memory(self) -> dict:
        """The same report as GET /memory; without a recipe behind it, the engine's own view."""
        if self._memory is None:
            return {"engine": {"backend": self.engine.name, **self.engine.memory().as_dict()}}
        return self._memory()

    def _loop(self) -> asyncio.AbstractEventLoop:
        # One event loop for all sync calls, on a thread of its own: engines that bind to the loop
        # that first uses them (LMDeploy's does) keep working across calls.
        if self._sync_loop is None:
            self._sync_loop = asyncio.new_event_loop()
            threading.Thread(target=self._sync_loop.run_forever, daemon=True,
                             name="assistant-loop").start()
        return self._sync_loop

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop()).result()

    def close(self) -> None:
        self.engine.close()
        if self._sync_loop is not None:
            self._sync_loop.call_soon_threadsafe(self._sync_loop.stop)
            self._sync_loop = None

    def __enter__(self) -> Assistant:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _as_messages(conversation: str | list[Message]) -> list[Message]:
    return [{"role": "user", "content": conversation}] if isinstance(conversation, str) \
        else conversation
