"""The llama.cpp source build's flags: the Makefile's (a fresh `make install`) and the image
wheelhouse's must be one build, and the file that keeps libcommon out (and builds libllama at -O1) must be
where they say and do that to a project named llama.cpp."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from deploy.package.wheelhouse import LLAMA_CMAKE_ARGS, SKIP_COMMON
from tests.helpers import ROOT


def test_the_makefile_and_the_wheelhouse_build_llama_cpp_alike():
    line = re.search(r"^export CMAKE_ARGS \?= (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert line, "the Makefile exports CMAKE_ARGS for the llama.cpp build"
    assert line.group(1).replace("$(CURDIR)", str(ROOT)) == LLAMA_CMAKE_ARGS


def _configure(tmp_path, *extra: str) -> dict[str, str]:
    """A stand-in llama.cpp project (its name, a `llama` and a `ggml` target) configured with the
    kit's include file as llama-cpp-python configures the real one; each target's CXX flags."""
    source = tmp_path / "src"
    source.mkdir(parents=True)
    (source / "a.cpp").write_text("int a() { return 1; }\n")
    (source / "CMakeLists.txt").write_text(
        'cmake_minimum_required(VERSION 3.21)\nproject("llama.cpp" CXX)\n'
        "add_library(llama SHARED a.cpp)\nadd_library(ggml SHARED a.cpp)\n"
        'file(WRITE "${CMAKE_BINARY_DIR}/common.txt" "${LLAMA_BUILD_COMMON}")\n')
    build = tmp_path / "build"
    run = subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                          "-DLLAMA_BUILD_COMMON=ON", f"-DCMAKE_PROJECT_llama.cpp_INCLUDE={SKIP_COMMON}",
                          *extra], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    flags = {t: re.search(r"^CXX_FLAGS = (.*)$", (build / "CMakeFiles" / f"{t}.dir" / "flags.make")
                          .read_text(), re.M).group(1) for t in ("llama", "ggml")}
    return {**flags, "common": (build / "common.txt").read_text()}


def _last_opt(flags: str) -> str:
    return re.findall(r"(?:^|\s)(-O\d)", flags)[-1]  # GCC keeps the last -O


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_the_include_file_drops_libcommon_and_builds_libllama_at_o1(tmp_path):
    include = re.search(r"-DCMAKE_PROJECT_llama\.cpp_INCLUDE=(\S+)", LLAMA_CMAKE_ARGS).group(1)
    assert include == str(SKIP_COMMON) and SKIP_COMMON.is_file()
    built = _configure(tmp_path)
    # A normal variable shadows the LLAMA_BUILD_COMMON=ON that llama-cpp-python puts in the cache.
    assert built["common"] == "OFF"
    assert _last_opt(built["llama"]) == "-O1" and _last_opt(built["ggml"]) == "-O3"
    upstream = _configure(tmp_path / "o3", "-DXLAB_LLAMA_OPT=3")
    assert _last_opt(upstream["llama"]) == "-O3"
