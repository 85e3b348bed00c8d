"""Engines behind one interface (see base.py); `load_engine` picks and builds one for a recipe."""

from __future__ import annotations

import importlib.util
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
    "lmdeploy_problem",
    "visible_gpus",
]

log = logging.getLogger(__name__)


def pick_backend(recipe: Recipe) -> str:
    """The backend `auto` resolves to on this machine, logged with the reason."""
    if recipe.engine.backend != "auto":
        return recipe.engine.backend
    backend, why = _auto_backend()
    log.info("engine.backend auto -> %s (%s)", backend, why)
    return backend


def _auto_backend() -> tuple[str, str]:
    if importlib.util.find_spec("lmdeploy") is None:
        return "transformers", "LMDeploy is not installed"
    gpus = visible_gpus()
    if gpus == 0:
        return "transformers", "no CUDA GPU is visible"
    from lmdeploy import turbomind

    if turbomind.is_available():
        return "lmdeploy-turbomind", "TurboMind's native module loads"
    return "lmdeploy-pytorch", f"TurboMind is unavailable here ({turbomind._import_error})"


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def load_engine(recipe: Recipe, model_dir: Path) -> Engine:
    backend = pick_backend(recipe)
    if backend == "transformers":
        _refuse_unsupported_on_transformers(recipe, model_dir)
        from deploy.engines.transformers_engine import TransformersEngine

        return TransformersEngine(
            model_dir,
            dtype=recipe.engine.dtype,
            session_len=recipe.engine.session_len,
            chat_template=chat_template_text(recipe),
        )
    check_lmdeploy_can_run(recipe, backend)
    from deploy.engines.lmdeploy_engine import LMDeployEngine

    return LMDeployEngine(model_dir, recipe, backend)


def check_lmdeploy_can_run(recipe: Recipe, backend: str) -> None:
    installed = importlib.util.find_spec("lmdeploy") is not None
    problem = lmdeploy_problem(backend, recipe.engine.tp, installed, visible_gpus() if installed else 0)
    if problem:
        raise RecipeError(problem)


def lmdeploy_problem(backend: str, tp: int, installed: bool, gpus: int) -> str | None:
    """Why an LMDeploy backend cannot start on this machine, as advice; None if it can."""
    if not installed:
        return (f"engine.backend {backend!r} needs LMDeploy: pip install 'xlab-deploy[lmdeploy]' on a "
                "machine with an NVIDIA GPU, or set engine.backend: transformers.")
    if gpus == 0:
        return (f"engine.backend {backend!r} needs an NVIDIA GPU and none is visible. Use "
                "engine.backend: transformers (CPU), or run on a GPU machine.")
    if tp > gpus:
        return (f"engine.tp is {tp} but {gpus} GPU(s) are visible: lower engine.tp to {gpus} or "
                "less, or check CUDA_VISIBLE_DEVICES.")
    return None


def _refuse_unsupported_on_transformers(recipe: Recipe, model_dir: Path) -> None:
    q = recipe.quantization
    if q.kv_cache != "none":
        raise RecipeError(
            f"quantization.kv_cache {q.kv_cache!r} is served by LMDeploy on a GPU; the transformers "
            "engine runs an unquantized KV cache. Set quantization.kv_cache: none, or use an "
            "lmdeploy backend on a GPU."
        )
    from deploy.quantize import HQQ_MARKER

    if q.weights != "none" and not (Path(model_dir) / HQQ_MARKER).is_file():
        raise RecipeError(
            f"quantization.weights 'w4a16' needs quantized weights, and {model_dir} holds none: run "
            "`python -m deploy build RECIPE` first (make deploy does)."
        )
