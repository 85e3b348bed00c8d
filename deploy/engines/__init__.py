"""Engines behind one interface (see base.py); `load_engine` picks and builds one for a recipe."""

from __future__ import annotations

import logging
from pathlib import Path

from deploy.engines.base import (
    Delta,
    Engine,
    EngineMemory,
    GenerationParams,
    Message,
    PromptTooLongError,
)
from deploy.recipe import Recipe, RecipeError, chat_template_text

__all__ = [
    "Delta",
    "Engine",
    "EngineMemory",
    "GenerationParams",
    "Message",
    "PromptTooLongError",
    "load_engine",
    "pick_backend",
]

log = logging.getLogger(__name__)


def pick_backend(recipe: Recipe) -> str:
    """The backend `auto` resolves to on this machine, logged with the reason."""
    if recipe.engine.backend != "auto":
        return recipe.engine.backend
    backend, why = "transformers", "LMDeploy is not installed"
    log.info("engine.backend auto -> %s (%s)", backend, why)
    return backend


def load_engine(recipe: Recipe, model_dir: Path) -> Engine:
    backend = pick_backend(recipe)
    if backend == "transformers":
        _refuse_unsupported_on_transformers(recipe)
        from deploy.engines.transformers_engine import TransformersEngine

        return TransformersEngine(
            model_dir,
            dtype=recipe.engine.dtype,
            session_len=recipe.engine.session_len,
            chat_template=chat_template_text(recipe),
        )
    raise RecipeError(
        f"engine.backend {backend!r} needs LMDeploy on a GPU: pip install 'xlab-deploy[lmdeploy]'."
    )


def _refuse_unsupported_on_transformers(recipe: Recipe) -> None:
    q = recipe.quantization
    if q.kv_cache != "none":
        raise RecipeError(
            f"quantization.kv_cache {q.kv_cache!r} is served by LMDeploy on a GPU; the transformers "
            "engine runs an unquantized KV cache. Set quantization.kv_cache: none, or use an "
            "lmdeploy backend."
        )
    if q.weights != "none":
        raise RecipeError(
            "quantization.weights 'w4a16' is served by LMDeploy on a GPU; the transformers engine "
            "serves unquantized weights. Set quantization.weights: none, or use an lmdeploy backend."
        )
