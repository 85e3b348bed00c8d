"""What serving needs from a recipe, narrowed at the boundary (as `EngineConfig` is for engines).

`serve_config` and `load_model` are the only places on the serving side that read a recipe
(tests/layers/test_layers.py holds that): the server, its handlers, the UI and the terminal chat see a
frozen `ServeConfig` and an engine, never the recipe.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from deploy.builder.manifest import built_model_dir
from deploy.capacity.memory import memory_report
from deploy.capacity.ram_planner import preflight, this_machine
from deploy.engines import Engine, engine_config, load_engine, resolve_weights, visible_gpus
from deploy.recipe import Recipe, RecipeError, load_recipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """The serving settings of one recipe. Tests and callers derive variants with
    `dataclasses.replace(config, max_pending=1)`; the recipe's schema holds the defaults."""

    name: str  # the model id clients send, and the metrics' recipe label
    mode: Literal["gradio", "api", "chat"]
    host: str
    port: int
    title: str
    description: str
    examples: tuple[str, ...]
    max_tokens: int  # the answer length when a client sets none
    system_prompt: str | None
    max_pending: int  # generation requests admitted at once (served or waiting); more get 503
    max_request_bytes: int
    max_connections: int
    api_key_env: str | None
    metrics: bool
    # What /metrics labels the build with: {"weights": ..., "kv_cache": ...}.
    quantization: dict[str, str] = field(default_factory=dict)


def serve_config(recipe: Recipe) -> ServeConfig:
    s = recipe.serve
    return ServeConfig(
        name=recipe.name, mode=s.mode, host=s.host, port=s.port, title=s.title,
        description=s.description, examples=tuple(s.examples), max_tokens=s.max_tokens,
        system_prompt=recipe.model.system_prompt, max_pending=s.max_pending,
        max_request_bytes=s.max_request_bytes, max_connections=s.max_connections,
        api_key_env=s.api_key_env, metrics=s.metrics,
        quantization={"weights": recipe.quantization.weights, "kv_cache": recipe.quantization.kv_cache},
    )


def _check_memory(recipe: Recipe, backend: str, folder: Path) -> None:
    """A llama.cpp server whose KV cache cannot fit is refused before it loads, with what to
    change (ram_planner.preflight); the transformers engine on a CPU gets a warning at most."""
    if backend not in ("llamacpp", "transformers") or (backend == "transformers" and visible_gpus()):
        return
    config_file = folder / "config.json"
    if not config_file.is_file():
        return
    ggufs = sorted(folder.glob("*.gguf")) if backend == "llamacpp" else []
    problem = preflight(recipe, json.loads(config_file.read_text()), this_machine(),
                        ggufs[0] if len(ggufs) == 1 else None)
    if problem:
        raise RecipeError(problem)


def load_model(recipe: Recipe | str | Path, *, force: bool = False
               ) -> tuple[ServeConfig, Engine, Callable[[], dict]]:
    """The recipe's serving settings, its built model on its engine, and the memory report for
    that engine (GET /memory). Quantized weights must have passed the builder's quality gate;
    `force=True` loads them anyway, with a warning."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    recipe = resolve_weights(recipe)
    started = time.perf_counter()
    folder = built_model_dir(recipe, force=force)
    log.info("model ready at %s (%.1fs)", folder, time.perf_counter() - started)
    settings = engine_config(recipe)
    _check_memory(recipe, settings.backend, folder)
    started = time.perf_counter()
    engine = load_engine(settings, folder)
    log.info("engine %s loaded (%.1fs)", engine.name, time.perf_counter() - started)
    return serve_config(recipe), engine, functools.partial(memory_report, engine, recipe)
