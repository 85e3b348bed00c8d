"""What a CPU image's venv carries that serving never reads, taken out in the image's build stage.

Run there as `python -m deploy.package.slim /opt/venv` (docker/Dockerfile.cpu); it prints what it
removed. Each entry says why the kit never reads it; the container tests then serve the trimmed
image (API and Gradio, the Gradio page in Chromium), so a wrong entry fails them. Sizes are those
of the wheels installed in the image on 2026-12-03 (docs/data/container-report-*.json).
Standard library only: it runs in the image, where the kit's host-side libraries are absent.
"""

from __future__ import annotations

import filecmp
import shutil
import sys
from pathlib import Path

# (a glob under site-packages, why serving never reads it)
UNUSED: tuple[tuple[str, str], ...] = (
    ("pandas/tests", "pandas' own test suite (46 MB), which `import pandas` never reads"),
    ("numpy/tests", "numpy's own tests"),
    ("numpy/*/tests", "numpy's own tests (12 MB with the above)"),
    ("gradio/templates/frontend/static/ffmpeg",
     "ffmpeg.wasm (32 MB), which gradio's page fetches only to trim video or audio in the browser; "
     "the chat UI has no such component"),
    ("gradio/templates/node",
     "gradio's server-side rendering build (13 MB), run only by Node.js, which the image lacks"),
    ("gradio/media_assets",
     "sample media for gradio's demos (7 MB), read only by gradio.media's helpers"),
)
# llama-cpp-python's wheel installs llama.cpp's CMake output twice: into llama_cpp/lib, which
# llama_cpp loads (llama_cpp/llama_cpp.py, `_base_path`), and into site-packages/lib (37 MB).
LLAMA_CPP_COPY = "lib"


def site_packages(venv: Path) -> Path:
    found = sorted(Path(venv).glob("lib/python3*/site-packages"))
    if len(found) != 1:
        raise SystemExit(f"{venv} is not a Python venv with one site-packages folder "
                         f"(found {len(found)}); pass the venv's root, e.g. /opt/venv.")
    return found[0]


def size_of(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def unused_paths(packages: Path) -> list[tuple[Path, str]]:
    found = [(p, why) for pattern, why in UNUSED for p in sorted(packages.glob(pattern)) if p.is_dir()]
    copy = packages / LLAMA_CPP_COPY
    # Only the copy llama-cpp-python made: one holding libllama, beside a llama_cpp that has its own.
    if (copy / "libllama.so").is_file() and (packages / "llama_cpp" / "lib" / "libllama.so").is_file():
        found.append((copy, "llama.cpp's libraries a second time (llama_cpp loads llama_cpp/lib)"))
    return found


def link_duplicate_libraries(folder: Path) -> int:
    """Byte-identical copies of a shared library under its versioned names (libggml.so,
    libggml.so.0, libggml.so.0.25.3: wheels cannot hold symlinks) become links to one file, as a
    system install has them. Returns the bytes saved."""
    saved = 0
    libraries = sorted((p for p in folder.glob("lib*.so*") if p.is_file() and not p.is_symlink()),
                       key=lambda p: (len(p.name), p.name))
    kept: list[Path] = []
    for library in libraries:
        twin = next((k for k in kept if library.name.startswith(k.name.split(".so")[0] + ".so")
                     and filecmp.cmp(k, library, shallow=False)), None)
        if twin is None:
            kept.append(library)
            continue
        saved += library.stat().st_size
        library.unlink()
        library.symlink_to(twin.name)
    return saved


def slim(venv: Path) -> list[tuple[str, int, str]]:
    """Removes what serving never reads from `venv`; returns (path, bytes, why) per removal."""
    packages = site_packages(venv)
    removed = []
    for path, why in unused_paths(packages):
        removed.append((str(path.relative_to(packages)), size_of(path), why))
        shutil.rmtree(path)
    library_dir = packages / "llama_cpp" / "lib"
    if library_dir.is_dir():
        saved = link_duplicate_libraries(library_dir)
        if saved:
            removed.append(("llama_cpp/lib (copies)", saved,
                            "identical copies of each library under its versioned names, now links"))
    return removed


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m deploy.package.slim VENV  (e.g. /opt/venv)")
    removed = slim(Path(args[0]))
    for path, size, why in removed:
        print(f"slim: {path}: {size / 1e6:.1f} MB ({why})")
    print(f"slim: {sum(size for _, size, _ in removed) / 1e6:.1f} MB removed in all")


if __name__ == "__main__":
    main()
