"""The llama.cpp source build's flags: the Makefile's (a fresh `make install`) and the image
wheelhouse's must be one build, and the file that keeps libcommon out must be where they say."""

from __future__ import annotations

import re

from deploy.package.wheelhouse import LLAMA_CMAKE_ARGS, SKIP_COMMON
from tests.helpers import ROOT


def test_the_makefile_and_the_wheelhouse_build_llama_cpp_alike():
    line = re.search(r"^export CMAKE_ARGS \?= (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert line, "the Makefile exports CMAKE_ARGS for the llama.cpp build"
    assert line.group(1).replace("$(CURDIR)", str(ROOT)) == LLAMA_CMAKE_ARGS


def test_the_include_file_shadows_llama_build_common():
    include = re.search(r"-DCMAKE_PROJECT_llama\.cpp_INCLUDE=(\S+)", LLAMA_CMAKE_ARGS).group(1)
    assert include == str(SKIP_COMMON) and SKIP_COMMON.is_file()
    commands = [line.split("#")[0].strip() for line in SKIP_COMMON.read_text().splitlines()]
    # A normal variable (no CACHE ... FORCE): it must shadow llama-cpp-python's forced cache entry.
    assert [c for c in commands if c] == ["set(LLAMA_BUILD_COMMON OFF)"]
