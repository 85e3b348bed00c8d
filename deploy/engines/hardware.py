"""What this machine offers the engines: the CPUs and memory this process may use, LMDeploy installed or not,
CUDA GPUs, and NVML's view of GPU memory (the memory report and LMDeploy's environment-check key
read it)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import platform
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


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


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> tuple[int, str]:
    """How many CPUs this process may keep busy, and what limited it: its affinity (taskset,
    `docker run --cpuset-cpus`) and its cgroup's CPU quota (`docker run --cpus`, a swarm service's
    `limits.cpus`), whichever is lower. `os.cpu_count()` counts the host's CPUs and ignores both.

    A quota is rounded to the nearest whole CPU (at least 1): llama.cpp's threads spin while they
    wait for each other, and a second thread cost more than it added under a 1-CPU quota, not
    under a 1.5-CPU one (docs/cpu-runtimes.md, "Threads"). joblib's loky `cpu_count` reads the
    same kind of files, but only at the mount's root, so on a host it misses a process's own
    cgroup (systemd-run -p CPUQuota=, the benchmark's); and the server would import joblib."""
    host = os.cpu_count() or 1
    count, why = host, f"{_cpus(host)} on this machine"
    with contextlib.suppress(AttributeError, OSError):
        pinned = len(os.sched_getaffinity(0))
        if pinned < count:
            count, why = pinned, f"{_cpus(pinned)} in this process's CPU affinity"
    quota = cgroup_cpu_quota(cgroup)
    granted = max(1, int(quota + 0.5)) if quota is not None else count
    if granted < count:
        plural = "" if quota == 1 else "s"
        count, why = granted, f"a CPU quota of {quota:g} CPU{plural} (its cgroup)"
    return count, why


def cpu_threads(configured: int | None) -> tuple[int, str]:
    """The CPU threads an engine runs, and why: `engine.threads` where the recipe sets it, else
    `usable_cpus()`. More threads than usable CPUs is allowed (the user may know better) but
    warned about, naming the field."""
    usable, why = usable_cpus()
    if configured is None:
        return usable, why
    if configured > usable:
        log.warning("engine.threads is %d but this process may use %s: threads beyond that wait "
                    "on each other (llama.cpp's spin). Lower engine.threads, or leave it unset to "
                    "use %d.", configured, why, usable)
    return configured, "engine.threads"


def _cpus(n: int) -> str:
    return f"{n} CPU" + ("" if n == 1 else "s")


def cgroup_cpu_quota(cgroup: Path = Path("/sys/fs/cgroup"),
                     membership: Path = Path("/proc/self/cgroup")) -> float | None:
    """The lowest CPU quota, in CPUs (quota / period), on this process's cgroup and its parents;
    None where there is none. cgroup v2: `cpu.max` ("max 100000" is none); v1: `cpu.cfs_quota_us`
    (-1 is none) over `cpu.cfs_period_us` under the `cpu` hierarchy. `membership` names this
    process's cgroup; inside a container that path may not exist under the mount, whose root is
    then the container's own cgroup, so the root is read too."""
    quotas = []
    for folder, v2 in _cgroup_folders(cgroup, membership):
        try:
            if v2:
                quota, period = (folder / "cpu.max").read_text().split()
            else:
                quota = (folder / "cpu.cfs_quota_us").read_text().strip()
                period = (folder / "cpu.cfs_period_us").read_text().strip()
        except (OSError, ValueError):
            continue
        if quota != "max" and int(quota) > 0 and int(period) > 0:
            quotas.append(int(quota) / int(period))
    return min(quotas) if quotas else None


def usable_ram(cgroup: Path = Path("/sys/fs/cgroup"),
               membership: Path = Path("/proc/self/cgroup")) -> tuple[int, str]:
    """How much memory this process's machine offers it, and what limited it: the RAM, or its
    cgroup's memory limit (`docker run --memory`, compose `mem_limit`, a swarm service's
    `limits.memory`), whichever is lower. The kernel kills a process past the limit, whatever
    the RAM."""
    total = psutil.virtual_memory().total
    limit = cgroup_memory_limit(cgroup, membership)
    if limit is not None and limit < total:
        return limit, "its cgroup's memory limit"
    return total, "its RAM"


def cgroup_memory_limit(cgroup: Path = Path("/sys/fs/cgroup"),
                        membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """The lowest memory limit in bytes on this process's cgroup and its parents; None where there
    is none. cgroup v2: `memory.max` ("max" is none); v1: `memory.limit_in_bytes`, where "none" is
    written as a number near 2**63."""
    limits = []
    for folder, v2 in _cgroup_folders(cgroup, membership, "memory"):
        with contextlib.suppress(OSError, ValueError):
            text = (folder / ("memory.max" if v2 else "memory.limit_in_bytes")).read_text().strip()
            if text != "max" and 0 < int(text) < 2**62:
                limits.append(int(text))
    return min(limits) if limits else None


def _cgroup_folders(cgroup: Path, membership: Path,
                    controller: str = "cpu") -> list[tuple[Path, bool]]:
    """This process's cgroup folders with `controller` (cgroup v1's hierarchy of that name, or v2's
    unified one), and their parents up to the mount."""
    own = {}  # "v2" or "v1" -> path inside the hierarchy
    with contextlib.suppress(OSError):
        for line in membership.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                own["v2"] = path
            elif controller in controllers.split(","):
                own["v1"] = path
    folders = []
    for v2, root in ((True, cgroup), (False, cgroup / controller)):
        path = Path(own.get("v2" if v2 else "v1", "/"))
        for part in (path, *path.parents):
            folder = root / str(part).lstrip("/")
            if folder.is_dir() and (folder, v2) not in folders:
                folders.append((folder, v2))
    return folders


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
