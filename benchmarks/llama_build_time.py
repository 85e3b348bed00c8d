"""How long llama-cpp-python takes to build from source with the kit's flags, with and without its
multimodal library (mtmd, `-DLLAVA_BUILD=OFF`), which the kit never loads, and each later step.

Usage: python -m benchmarks.llama_build_time [--runs 3] [--variants "NAME;NAME"]
       [--out docs/data/llama-build-time.json] [--keep DIR]

The source build is most of a fresh `make install` on a CPU machine (no wheel for these flags is
published). Each run is `pip wheel --no-deps --no-cache-dir` of the same sdist into an empty
folder, variants alternating so that each sees the same minutes; the wheel's size is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from benchmarks._common import cpu_name
from deploy.package.wheelhouse import LLAMA_CMAKE_ARGS

VERSION = "0.3.36"
# The kit's flags before they dropped the multimodal library, then each step since: no mtmd; a
# unity build without libcommon (deploy/package/llama_skip_common.cmake), today's LLAMA_CMAKE_ARGS.
BASE = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
        "-DGGML_OPENMP=OFF")
AVX512 = (" -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON")
# The last two differ in libllama's optimization level only (llama_skip_common.cmake).
VARIANTS = {"kit flags": "", "kit flags, no mtmd": " -DLLAVA_BUILD=OFF",
            "kit flags, no mtmd, unity, no libcommon": LLAMA_CMAKE_ARGS.removeprefix(BASE)
            + " -DXLAB_LLAMA_OPT=3",
            "kit flags, no mtmd, unity, no libcommon, libllama -O1": LLAMA_CMAKE_ARGS.removeprefix(BASE),
            # Today's flags plus the AVX-512 families an AVX512-BF16 CPU has: a wheel that runs on
            # such CPUs only, to measure what the portable AVX2 build leaves unused there
            # (benchmarks/llama_wheel_speed.py --gguf F16,BF16).
            "kit flags + AVX-512": LLAMA_CMAKE_ARGS.removeprefix(BASE) + AVX512,
            # Today's flags with OpenMP threads (needs libgomp at run time), whose barrier can
            # sleep (OMP_WAIT_POLICY) where ggml's own spins (benchmarks/cpu_llama_threads.py).
            "kit flags + OpenMP": LLAMA_CMAKE_ARGS.removeprefix(BASE) + " -DGGML_OPENMP=ON",
            # llama.cpp's runtime dispatch: its CPU code compiled once per x86 family, the best
            # loaded at run time (a lead for AVX-512/BF16 CPUs, docs/cpu-runtimes.md). Measures
            # what it costs to compile, and which libraries llama-cpp-python puts in its wheel.
            "kit flags + all CPU variants": LLAMA_CMAKE_ARGS.removeprefix(BASE)
            + " -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON"}


def sdist(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    "-d", str(folder), f"llama-cpp-python=={VERSION}"], check=True)
    return next(folder.glob("llama_cpp_python-*.tar.gz"))


class BuildFailed(Exception):
    def __init__(self, seconds: float, detail: dict):
        super().__init__(detail)
        self.seconds, self.detail = seconds, detail


def build_failure(log: str) -> dict:
    """The last ninja step reached ("[71/126]") and the first compiler errors, from pip's -v log."""
    steps = re.findall(r"^\s*\[(\d+)/(\d+)\]", log, re.MULTILINE)
    failed = re.findall(r"^\s*FAILED: (.+)$", log, re.MULTILINE)
    errors = [line.strip() for line in log.splitlines() if ": error: " in line]
    return {"last_step": "/".join(steps[-1]) if steps else None, "failed_targets": failed[:3],
            "first_errors": errors[:4]}


def build(source: Path, extra: str, keep: Path | None, tag: str = "variant") -> tuple[float, int, list]:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "CMAKE_ARGS": BASE + extra}
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-cache-dir",
                               "-w", out, str(source)], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode:  # a variant that does not build: how far it got, and the first errors
            raise BuildFailed(seconds, build_failure(done.stdout + done.stderr))
        wheel = next(Path(out).glob("*.whl"))
        if keep:  # a folder per variant: pip wants a wheel's file name as built
            (keep / tag).mkdir(parents=True, exist_ok=True)
            shutil.copy(wheel, keep / tag / wheel.name)
        with zipfile.ZipFile(wheel) as z:
            libs = sorted(Path(n).name for n in z.namelist() if ".so" in Path(n).name)
        return seconds, wheel.stat().st_size, libs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("docs/data/llama-build-time.json"))
    parser.add_argument("--keep", type=Path, help="a folder to copy each variant's wheel into")
    parser.add_argument("--variants", help="variant names separated by semicolons (default: all): "
                        + "; ".join(VARIANTS))
    args = parser.parse_args()
    variants = {n: VARIANTS[n] for n in (args.variants.split(";") if args.variants else VARIANTS)}
    results: dict[str, dict] = {name: {"seconds": [], "wheel_bytes": None} for name in variants}
    with tempfile.TemporaryDirectory() as folder:
        source = sdist(Path(folder))
        for run in range(args.runs):
            for number, (name, extra) in enumerate(variants.items()):
                try:
                    seconds, size, libs = build(source, extra, args.keep, f"variant{number}")
                except BuildFailed as failed:
                    results[name].setdefault("failed", []).append(
                        {"after_s": round(failed.seconds, 1), **failed.detail})
                    print(f"run {run + 1} {name}: failed after {failed.seconds:.1f} s: {failed.detail}",
                          flush=True)
                    continue
                results[name]["seconds"].append(round(seconds, 1))
                results[name]["wheel_bytes"], results[name]["wheel_libraries"] = size, libs
                print(f"run {run + 1} {name}: {seconds:.1f} s, wheel {size / 1e6:.1f} MB", flush=True)
    for entry in results.values():
        entry["median_s"] = statistics.median(entry["seconds"]) if entry["seconds"] else None
    report = {"what": f"pip wheel of llama-cpp-python {VERSION} from source, no pip cache",
              "cmake_args": BASE, "variants": variants, "cpu": cpu_name(),
              "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
