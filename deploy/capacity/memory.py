"""The memory report behind GET /memory: GPUs through NVML, this process's RSS, the engine's view,
and the planner's prediction beside them (the GPU planner, or on a CPU the RAM planner)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import psutil

from deploy.engines.hardware import gpu_report
from deploy.recipe import Recipe

if TYPE_CHECKING:
    from deploy.engines import Engine


def memory_report(engine: Engine, recipe: Recipe) -> dict:
    process = psutil.Process()
    gpus = gpu_report(process.pid)
    engine_memory = engine.memory()
    return {
        **gpus,
        "process": {"pid": process.pid, "rss_bytes": process.memory_info().rss},
        "engine": {"backend": engine.name, **engine_memory.as_dict()},
        "prediction": _prediction(engine, recipe, gpus["gpus"], engine_memory.device),
        "settings": {
            "engine": recipe.engine.model_dump(),
            "quantization": {
                "weights": recipe.quantization.weights,
                "kv_cache": recipe.quantization.kv_cache,
            },
        },
    }


def _prediction(engine: Engine, recipe: Recipe, gpus: list[dict], device: str) -> dict:
    """What `deploy plan` predicts for this machine, to read beside the measured numbers."""
    from deploy.capacity.planner import plan

    if device == "cpu":
        return _ram_prediction(engine, recipe)
    if not gpus or not engine.name.startswith("lmdeploy"):
        # Without a pre-allocated KV cache (transformers) only weights and KV per token apply.
        from deploy.engines.sizing import kv_bytes_per_token, weight_bytes

        q, config = recipe.quantization, engine.model_config
        return {"weight_bytes": weight_bytes(config, q.weights, recipe.engine.dtype, q.group_size),
                "kv_bytes_per_token": kv_bytes_per_token(config, q.kv_cache)}
    p = plan(recipe, engine.model_config, gpu_total=(gpus[0]["name"], gpus[0]["total_bytes"]))
    keys = ("weight_bytes", "kv_bytes_per_token", "kv_blocks", "kv_capacity_tokens",
            "kv_cache_bytes", "sessions_that_fit", "nvidia_smi_used_bytes")
    return {k: getattr(p, k) for k in keys}


def _ram_prediction(engine: Engine, recipe: Recipe) -> dict:
    """The RAM plan (ram_planner.py) for this machine: its `rss_bytes` is process.rss_bytes's
    prediction. For transformers, at full sessions (the KV grows as they fill)."""
    from deploy.capacity.ram_planner import plan_ram, this_machine

    p = plan_ram(recipe, engine.model_config, this_machine(), getattr(engine, "gguf", None))
    keys = ("base_bytes", "weight_bytes", "kv_bytes_per_token", "kv_cache_bytes", "working_bytes",
            "rss_bytes", "sessions_that_fit", "machine", "ram_bytes", "fits")
    return {"device": "cpu", **{k: getattr(p, k) for k in keys}}
