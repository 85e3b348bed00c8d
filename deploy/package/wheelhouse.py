"""A wheelhouse for an image: every wheel its requirements need, collected on the host, so that the
image builds with `pip install --no-index` and needs no network at all.

pip on the host uses whatever index or mirror the host's pip is configured with, which is what a
user behind a mirror needs. The wheels are built for this Python, so the host must run the image's
Python version. One wheelhouse per requirements text is kept in the kit's cache and hard-linked into
each build context.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

from deploy.atomic import atomic_dir
from deploy.errors import KitError
from deploy.home import cache_home

IMAGE_PYTHON = (3, 11)  # docker/Dockerfile.cpu's base image


class WheelhouseError(KitError):
    """The wheels could not be collected; the message says what to do."""


TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# llama-cpp-python is a source build: portable AVX2, ggml's own threads, no multimodal library, a
# unity build without libcommon (the Makefile says why).
SKIP_COMMON = Path(__file__).with_name("llama_skip_common.cmake")
LLAMA_CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
                    "-DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF -DCMAKE_UNITY_BUILD=ON "
                    f"-DCMAKE_PROJECT_llama.cpp_INCLUDE={SKIP_COMMON}")


def wheelhouse(requirements: str, no_deps: tuple[str, ...] = (), torch: str | None = None) -> Path:
    """A folder holding a wheel for every requirement (dependencies included), for each of
    `no_deps` without its dependencies, and the requirements file itself; built once per
    requirements text and reused. `torch` constrains torch where a dependency pulls it in (its CPU
    build: pip would otherwise fetch a multi-GB CUDA wheel)."""
    if sys.version_info[:2] != IMAGE_PYTHON:
        want = ".".join(map(str, IMAGE_PYTHON))
        raise WheelhouseError(
            f"The CPU image runs Python {want}, and its wheels are collected by this Python "
            f"({platform.python_version()}): run `image context` or `image build` from a Python "
            f"{want} environment."
        )
    key = hashlib.sha256(f"{requirements}|{no_deps}|{torch}|{platform.machine()}".encode()).hexdigest()[:16]
    target = cache_home() / "wheelhouse" / key
    if (target / "requirements.txt").is_file():
        return target
    with atomic_dir(target, keep_existing=True) as work:
        (work / "requirements.txt").write_text(requirements)
        constraints = []
        if torch:
            (work / "constraints.txt").write_text(f"{torch}\n")
            constraints = ["-c", str(work / "constraints.txt")]
        _pip("wheel", "--wheel-dir", str(work), "-r", str(work / "requirements.txt"), *constraints)
        if no_deps:
            _pip("download", "--no-deps", "--only-binary=:all:", "--dest", str(work), *no_deps)
    return target


def _pip(*args: str) -> None:
    """pip with the host's own index settings; a +cpu torch pin may also need PyTorch's CPU index
    (the Makefile does the same)."""
    command = [sys.executable, "-m", "pip", *args[:1], "--quiet", *args[1:]]
    env = {**os.environ, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", LLAMA_CMAKE_ARGS)}
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    if run.returncode:
        run = subprocess.run([*command, "--extra-index-url", TORCH_CPU_INDEX], capture_output=True,
                             text=True, env=env)
    if run.returncode:
        raise WheelhouseError(
            "pip could not collect the image's wheels from this machine's package index: "
            f"{run.stderr.strip()[-800:]}\nCheck the network or your pip index / mirror "
            "(pip config list), then try again."
        )


def link_into(house: Path, out: Path) -> None:
    """The wheelhouse's files hard-linked into `out` (copied across disks)."""
    from deploy.atomic import link_or_copy

    out.mkdir(parents=True, exist_ok=True)
    for wheel in house.iterdir():
        link_or_copy(str(wheel), str(out / wheel.name))
