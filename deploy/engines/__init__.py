"""Stage 3, the engines: one interface (base.py) with a transformers and an LMDeploy engine behind
it. `load_engine` builds the one an `EngineConfig` (config.py) asks for.

Engines never import the build, serve, bench, capacity or package stages, and read no recipe: only
config.py knows the recipe's schema (tests/layers/test_layers.py checks both).
"""

from __future__ import annotations

from pathlib import Path

from deploy.engines.base import (
    HQQ_MARKER,
    Delta,
    Engine,
    EngineActivity,
    EngineMemory,
    GenerationParams,
    Message,
    PromptTooLongError,
    TokenLogprob,
)
from deploy.engines.config import EngineConfig, engine_config, pick_backend, resolve_weights
from deploy.engines.hardware import lmdeploy_installed, visible_gpus
from deploy.errors import RecipeError

__all__ = [
    "resolve_weights",
    "HQQ_MARKER",
    "Delta",
    "Engine",
    "EngineActivity",
    "EngineConfig",
    "EngineMemory",
    "GenerationParams",
    "Message",
    "PromptTooLongError",
    "TokenLogprob",
    "engine_config",
    "load_engine",
    "lmdeploy_problem",
    "pick_backend",
    "visible_gpus",
]


def load_engine(config: EngineConfig, model_dir: Path) -> Engine:
    if config.backend == "transformers":
        _refuse_unsupported_on_transformers(config, model_dir)
        from deploy.engines.transformers_engine import TransformersEngine

        return TransformersEngine(model_dir, dtype=config.dtype, session_len=config.session_len,
                                  max_batch_size=config.max_batch_size,
                                  threads=config.threads,
                                  chat_template=config.chat_template,
                                  trust_remote_code=config.trust_remote_code)
    if config.backend == "llamacpp":
        return _load_llamacpp(config, model_dir)
    check_lmdeploy_can_run(config)
    from deploy.engines.lmdeploy_engine import LMDeployEngine

    return LMDeployEngine(model_dir, config)


def _load_llamacpp(config: EngineConfig, model_dir: Path) -> Engine:
    try:
        from deploy.engines.llamacpp_engine import LlamaCppEngine
    except ImportError as exc:
        raise RecipeError(
            "engine.backend 'llamacpp' needs llama-cpp-python: run `make install` (it builds it "
            "for any AVX2 CPU), or set engine.backend: transformers.") from exc
    try:
        return LlamaCppEngine(model_dir, session_len=config.session_len,
                              max_batch_size=config.max_batch_size,
                              threads=config.threads,
                              chat_template=config.chat_template,
                              trust_remote_code=config.trust_remote_code)
    except ValueError as exc:
        raise RecipeError(str(exc)) from exc


def check_lmdeploy_can_run(config: EngineConfig) -> None:
    installed = lmdeploy_installed()
    problem = lmdeploy_problem(config.backend, config.tp, installed, visible_gpus() if installed else 0)
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


def _refuse_unsupported_on_transformers(config: EngineConfig, model_dir: Path) -> None:
    if config.kv_cache != "none":
        raise RecipeError(
            f"quantization.kv_cache {config.kv_cache!r} is served by LMDeploy on a GPU; the "
            "transformers engine runs an unquantized KV cache. Set quantization.kv_cache: none, or "
            "use an lmdeploy backend on a GPU."
        )
    if config.weights == "fp8":
        from deploy.engines.fp8_format import is_fp8_folder

        if not is_fp8_folder(model_dir):
            raise RecipeError(f"quantization.weights 'fp8' needs FP8 weights, and {model_dir} holds "
                              "none: run `python -m deploy build RECIPE` first (make deploy does).")
        return
    if config.weights != "none" and not (Path(model_dir) / HQQ_MARKER).is_file():
        raise RecipeError(
            f"quantization.weights 'w4a16' needs quantized weights, and {model_dir} holds none: run "
            "`python -m deploy build RECIPE` first (make deploy does)."
        )
