"""The engine's settings, and the one function that reads them off a recipe.

Engines take an `EngineConfig` and never see a recipe: this module is the single place where the
recipe's `model:`, `quantization:` and `engine:` sections become engine settings, and where
`engine.backend: auto` is resolved for this machine (and `quantization.weights: auto` for this
machine's GPU or a named one: formats.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from deploy.engines.formats import capability_for, fastest_weights
from deploy.engines.hardware import lmdeploy_installed, local_gpu, visible_gpus
from deploy.recipe import Recipe, chat_template_text

log = logging.getLogger(__name__)

Backend = Literal["transformers", "llamacpp", "lmdeploy-pytorch", "lmdeploy-turbomind"]


@dataclass(frozen=True)
class EngineConfig:
    """What an engine needs to load and serve a model folder. Field names follow the recipe's, so
    an engine's error message can name the recipe field to change."""

    backend: Backend
    dtype: str = "auto"  # auto, float16, bfloat16, float32
    session_len: int = 4096
    max_batch_size: int = 8
    threads: int | None = None  # CPU threads; None: the CPUs this process may use (usable_cpus)
    tp: int = 1
    own_process: bool = True  # LMDeploy's PyTorch engine in a process of its own
    cache_max_entry_count: float | None = None  # LMDeploy: share of free memory for the KV cache
    kv_cache_gib: float | None = None  # or an absolute KV budget
    weights: str = "none"  # none, w4a16, fp8, q4_1, q4_0 or q8_0: the weight format the folder must hold
    group_size: int = 128  # w4a16's quantization group
    kv_cache: str = "none"  # none, int8 or int4
    chat_template: str | None = None  # Jinja text overriding the tokenizer's own
    trust_remote_code: bool = False


def engine_config(recipe: Recipe, backend: str | None = None) -> EngineConfig:
    """The recipe in engine terms; `backend` overrides the recipe's (after `auto` is resolved)."""
    engine, quant = recipe.engine, recipe.quantization
    return EngineConfig(
        backend=pick_backend(backend or engine.backend),
        dtype=engine.dtype,
        session_len=engine.session_len,
        max_batch_size=engine.max_batch_size,
        threads=engine.threads,
        tp=engine.tp,
        own_process=engine.own_process,
        cache_max_entry_count=engine.cache_max_entry_count,
        kv_cache_gib=engine.kv_cache_gib,
        weights=quant.weights,
        group_size=quant.group_size,
        kv_cache=quant.kv_cache,
        chat_template=chat_template_text(recipe),
        trust_remote_code=recipe.model.trust_remote_code,
    )


def pick_backend(requested: str) -> Backend:
    """The backend `requested` resolves to on this machine; `auto` is logged with the reason."""
    if requested != "auto":
        return requested  # type: ignore[return-value]  # the recipe schema allows no other value
    backend, why = _auto_backend()
    log.info("engine.backend auto -> %s (%s)", backend, why)
    return backend


def _auto_backend() -> tuple[Backend, str]:
    if not lmdeploy_installed():
        return "transformers", "LMDeploy is not installed"
    if visible_gpus() == 0:
        return "transformers", "no CUDA GPU is visible"
    from lmdeploy import turbomind

    if turbomind.is_available():
        return "lmdeploy-turbomind", "TurboMind's native module loads"
    return "lmdeploy-pytorch", f"TurboMind is unavailable here ({turbomind._import_error})"


def resolve_weights(recipe: Recipe, gpu: str | None = None) -> Recipe:
    """The recipe with `quantization.weights: auto` replaced by the format that decodes fastest on
    `gpu` (a card name or size, as `plan --gpu` takes) or else this machine's GPU, the choice and
    its reason logged; any other recipe as it is."""
    quant = recipe.quantization
    if quant.weights != "auto":
        return recipe
    if gpu is not None:
        name, capability = gpu, capability_for(gpu)
    else:
        found = local_gpu()
        name, capability = found if found else (None, None)
    backend = recipe.engine.backend
    if backend == "auto":  # TurboMind wherever it loads: on the named card, assume it does
        backend = "lmdeploy-turbomind" if gpu is not None else pick_backend(backend)
    choice = fastest_weights(backend, name, capability, recipe.engine.dtype)
    log.info("quantization.weights auto -> %s (%s)", choice.weights, choice.reason)
    return recipe.model_copy(update={"quantization": quant.model_copy(update={"weights": choice.weights})})
