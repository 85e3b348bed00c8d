"""What this machine offers the engines: LMDeploy installed or not, CUDA GPUs, and NVML's view of
GPU memory (the memory report and LMDeploy's environment-check key read it)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
from pathlib import Path

import psutil


def cpu_name() -> str:
    """The CPU and the flags that decide its speed (AVX2, AVX-512, AVX512-BF16, AMX): machines of one
    kind differ in them, so every CPU figure is reported beside them."""
    name, flags = platform.processor(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile")
    return f"{name} ({', '.join(f for f in wanted if f in flags) or 'no AVX2'})"


def cpu_machine() -> str:
    """This CPU machine in a report's words: the CPU, its flags, the cores."""
    return f"CPU only: {cpu_name()}, {platform.machine()}, {os.cpu_count()} cores"


def lmdeploy_installed() -> bool:
    return importlib.util.find_spec("lmdeploy") is not None


def visible_gpus() -> int:
    """CUDA GPUs this process may use: NVML's count narrowed by CUDA_VISIBLE_DEVICES. Not torch's
    count, which imports torch: seconds on the serve path before LMDeploy's engine process is
    spawned (engine_process.py). torch answers only where NVML cannot."""
    try:
        import pynvml  # from nvidia-ml-py

        pynvml.nvmlInit()
    except Exception:  # no nvidia-ml-py, or no driver NVML can reach
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        count = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    return cuda_visible(count, os.environ.get("CUDA_VISIBLE_DEVICES"))


def cuda_visible(count: int, variable: str | None) -> int:
    """How many of `count` GPUs CUDA shows under CUDA_VISIBLE_DEVICES = `variable`: its entries
    (indices, or GPU-/MIG- UUIDs) up to the first invalid one, as CUDA reads it."""
    if variable is None:
        return count
    seen = 0
    for entry in variable.split(","):
        entry = entry.strip()
        if (entry.isdigit() and int(entry) < count) or entry.startswith(("GPU-", "MIG-")):
            seen += 1
        else:
            break
    return seen


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


def local_gpu() -> tuple[str, tuple[int, int]] | None:
    """The first visible GPU's name and CUDA compute capability, by NVML; None without one."""
    if visible_gpus() == 0:
        return None
    try:
        import pynvml  # from nvidia-ml-py

        pynvml.nvmlInit()
    except Exception:  # torch saw a GPU that NVML cannot: its name is unknown here
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        return (name.decode() if isinstance(name, bytes) else name), (int(major), int(minor))
    finally:
        pynvml.nvmlShutdown()
