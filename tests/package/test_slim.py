"""deploy/package/slim.py: what a CPU image's venv sheds. The container tests serve the trimmed
images (API and Gradio); these check the trimming itself on real files."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.package.slim import link_duplicate_libraries, slim

# Found without importing llama_cpp: importing it loads these libraries into this process, and the
# loader would then resolve the copies' dependencies to them by name, links or no links.
INSTALLED = Path(importlib.util.find_spec("llama_cpp").submodule_search_locations[0]) / "lib"


def venv_with(tmp_path: Path, files: list[str]) -> Path:
    packages = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    for name in files:
        (packages / name).parent.mkdir(parents=True, exist_ok=True)
        (packages / name).write_bytes(b"x" * 1000)
    return packages


def test_test_suites_and_llama_cpps_second_copy_go_and_the_rest_stays(tmp_path):
    packages = venv_with(tmp_path, [
        "pandas/__init__.py", "pandas/tests/test_a.py", "numpy/_core/tests/test_b.py",
        "numpy/_core/multiarray.py", "gradio/templates/node/build/index.js",
        "gradio/templates/frontend/static/ffmpeg/ffmpeg-core.wasm",
        "gradio/templates/frontend/index.html", "gradio/media_assets/images/a.png",
        "lib/libllama.so", "llama_cpp/lib/libllama.so"])
    removed = slim(tmp_path / "venv")
    assert {path for path, _, _ in removed} == {
        "pandas/tests", "numpy/_core/tests", "gradio/templates/node",
        "gradio/templates/frontend/static/ffmpeg", "gradio/media_assets", "lib"}
    assert all(size == 1000 and why for _, size, why in removed)
    for kept in ("pandas/__init__.py", "numpy/_core/multiarray.py", "llama_cpp/lib/libllama.so",
                 "gradio/templates/frontend/index.html"):
        assert (packages / kept).is_file(), kept
    assert not (packages / "lib").exists() and not (packages / "pandas" / "tests").exists()


def test_a_lib_folder_that_is_not_llama_cpps_copy_stays(tmp_path):
    packages = venv_with(tmp_path, ["lib/libllama.so", "lib/other.py"])  # no llama_cpp beside it
    assert slim(tmp_path / "venv") == []
    assert (packages / "lib" / "other.py").is_file()


def test_not_a_venv_is_named(tmp_path):
    with pytest.raises(SystemExit, match="not a Python venv"):
        slim(tmp_path)


def test_the_installed_llama_cpp_libraries_still_load_once_their_copies_are_links(tmp_path):
    """The real libraries of this machine's llama-cpp-python: linked, libllama still loads through
    its dependencies' versioned names (found beside it by its RUNPATH, $ORIGIN)."""
    folder = tmp_path / "lib"
    shutil.copytree(INSTALLED, folder, symlinks=True)
    before = sum(p.stat().st_size for p in folder.iterdir() if not p.is_symlink())
    saved = link_duplicate_libraries(folder)
    after = sum(p.stat().st_size for p in folder.iterdir() if not p.is_symlink())
    assert saved > 0 and after == before - saved
    assert (folder / "libggml.so.0").is_symlink() and (folder / "libllama.so").exists()
    assert link_duplicate_libraries(folder) == 0  # a second pass finds nothing left to link
    load = ("import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); "
            "print(hasattr(lib, 'llama_model_load_from_file'))")
    run = subprocess.run([sys.executable, "-c", load, str(folder / "libllama.so")],
                         capture_output=True, text=True)
    assert run.stdout.strip() == "True", run.stderr
    (folder / "libggml.so.0").unlink()  # the check can fail: without a dependency, no load
    run = subprocess.run([sys.executable, "-c", load, str(folder / "libllama.so")],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "libggml.so.0" in run.stderr
