"""The memory report behind GET /memory: GPUs through NVML, this process's RSS, the engine's view."""

from __future__ import annotations

import os

import psutil

from deploy.engines import Engine
from deploy.recipe import Recipe


def gpu_report(pid: int | None = None) -> dict:
    """Per-GPU name, total, used and this process's share; or no GPUs and the reason."""
    pid = pid or os.getpid()
    try:
        import pynvml  # from nvidia-ml-py
    except ImportError:
        return {"gpus": [], "gpu_reason": "nvidia-ml-py is not installed"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return {"gpus": [], "gpu_reason": f"NVML unavailable: {exc} (no NVIDIA GPU or driver)"}
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            gpus.append({
                "index": index,
                "name": name.decode() if isinstance(name, bytes) else name,
                "total_bytes": int(info.total),
                "used_bytes": int(info.used),
                "process_bytes": _process_share(pynvml, handle, pid),
            })
        return {"gpus": gpus, "gpu_reason": None if gpus else "NVML found no GPU"}
    finally:
        pynvml.nvmlShutdown()


def _process_share(pynvml, handle, pid: int) -> int | None:
    """GPU memory held by this process and its children (LMDeploy runs workers in children)."""
    try:
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except pynvml.NVMLError:
        return None
    family = {pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))}
    used = [p.usedGpuMemory for p in procs if p.pid in family and p.usedGpuMemory is not None]
    # Inside a container NVML may report host pids that match none of ours: unknown, not zero.
    return sum(used) if used else None


def memory_report(engine: Engine, recipe: Recipe) -> dict:
    process = psutil.Process()
    gpus = gpu_report(process.pid)
    return {
        **gpus,
        "process": {"pid": process.pid, "rss_bytes": process.memory_info().rss},
        "engine": {"backend": engine.name, **engine.memory().as_dict()},
        "prediction": _prediction(engine, recipe, gpus["gpus"]),
        "settings": {
            "engine": recipe.engine.model_dump(),
            "quantization": {
                "weights": recipe.quantization.weights,
                "kv_cache": recipe.quantization.kv_cache,
            },
        },
    }


def _prediction(engine: Engine, recipe: Recipe, gpus: list[dict]) -> dict:
    """What `deploy plan` predicts for this GPU, to read beside the measured numbers."""
    from deploy.planner import plan

    if not gpus or not engine.name.startswith("lmdeploy"):
        # Without a pre-allocated KV cache (transformers) only weights and KV per token apply.
        from deploy.sizing import kv_bytes_per_token, weight_bytes

        q, config = recipe.quantization, engine.model_config
        return {"weight_bytes": weight_bytes(config, q.weights, recipe.engine.dtype, q.group_size),
                "kv_bytes_per_token": kv_bytes_per_token(config, q.kv_cache)}
    p = plan(recipe, engine.model_config, gpu_total=(gpus[0]["name"], gpus[0]["total_bytes"]))
    keys = ("weight_bytes", "kv_bytes_per_token", "kv_blocks", "kv_capacity_tokens",
            "kv_cache_bytes", "sessions_that_fit", "nvidia_smi_used_bytes")
    return {k: getattr(p, k) for k in keys}
