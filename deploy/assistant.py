"""An assistant: a recipe's engine plus the recipe's conversation settings.

The server, the Gradio UI and the terminal chat all talk to this, so the system prompt and the
default answer length are applied in one place, whatever engine runs underneath.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from deploy.builder import built_model_dir
from deploy.engines import Delta, Engine, GenerationParams, Message, load_engine
from deploy.recipe import Recipe, load_recipe

log = logging.getLogger(__name__)


class Assistant:
    def __init__(self, recipe: Recipe, engine: Engine):
        self.recipe = recipe
        self.engine = engine

    @classmethod
    def from_recipe(cls, recipe: Recipe | str | Path) -> Assistant:
        if not isinstance(recipe, Recipe):
            recipe = load_recipe(recipe)
        started = time.perf_counter()
        folder = built_model_dir(recipe)
        log.info("model ready at %s (%.1fs)", folder, time.perf_counter() - started)
        started = time.perf_counter()
        engine = load_engine(recipe, folder)
        log.info("engine %s loaded (%.1fs)", engine.name, time.perf_counter() - started)
        return cls(recipe, engine)

    @property
    def model_name(self) -> str:
        return self.recipe.name

    def params(self, **overrides) -> GenerationParams:
        """Generation settings: the recipe's defaults with the caller's non-None overrides."""
        given = {k: v for k, v in overrides.items() if v is not None}
        given.setdefault("max_tokens", self.recipe.serve.max_tokens)
        if "stop" in given:
            given["stop"] = tuple(given["stop"])
        return GenerationParams(**given)

    def messages(self, messages: list[Message]) -> list[Message]:
        """The conversation as the engine sees it: the recipe's system prompt first if it has one."""
        system = self.recipe.model.system_prompt
        if system and not (messages and messages[0]["role"] == "system"):
            return [{"role": "system", "content": system}, *messages]
        return list(messages)

    def stream(self, messages: list[Message], params: GenerationParams) -> AsyncIterator[Delta]:
        return self.engine.stream_chat(self.messages(messages), params)

    async def chat(self, messages: list[Message], params: GenerationParams) -> Delta:
        return await self.engine.chat(self.messages(messages), params)

    def count_tokens(self, messages: list[Message]) -> int:
        return self.engine.count_tokens(self.messages(messages))

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Assistant:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
