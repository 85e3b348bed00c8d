"""Decode speed of llama.cpp wheels built with different flags, on this CPU: the check that a
shorter build (e.g. the unity build, benchmarks/llama_build_time.py) costs no speed.

Usage: python -m benchmarks.llama_wheel_speed NAME=WHEEL [NAME=WHEEL ...] [--runs 3] [--steps 96]
           [--gguf F16[,BF16,...]] [--out docs/data/llama-wheel-speed.json]

Each wheel is installed into its own folder, and each measurement runs in a fresh process with that
folder first on the path: bare `llama_decode` of 1 and of 8 sequences on the bundled model's GGUF
(benchmarks/cpu_batch_scaling.py's loop, no sampling or HTTP), the wheels alternating every round
so that each sees the same minutes. `--gguf` names llama.cpp file types: F16 is the file the
default recipe serves; another type is written from it once (llama_model_quantize), e.g. BF16,
which llama.cpp computes with AVX512-BF16 instructions where the wheel was built with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import cpu_name

SEQUENCES = (1, 8)


def gguf_file(kind: str) -> Path:
    """The bundled model's GGUF of llama.cpp file type `kind`; other than F16, written once beside
    it from the F16 file."""
    from deploy.builder.sources import bundled_model_dir
    from deploy.engines.llamacpp_engine import find_gguf

    f16 = find_gguf(bundled_model_dir("SmolLM2-135M-Instruct", False))
    if kind == "F16":
        return f16
    target = f16.parent.parent / f"SmolLM2-135M-Instruct-{kind.lower()}-bench" / f"model-{kind}.gguf"
    if not target.is_file():
        import llama_cpp as lib

        target.parent.mkdir(parents=True, exist_ok=True)
        params = lib.llama_model_quantize_default_params()
        params.ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{kind}")
        params.nthread = os.cpu_count() or 1
        if lib.llama_model_quantize(str(f16).encode(), str(target).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not write a {kind} GGUF from {f16}")
    return target


def worker(sequences: int, steps: int, path: Path) -> None:
    """In the measuring process: one decode rate, printed as JSON."""
    import llama_cpp as lib

    from benchmarks.cpu_batch_scaling import decode_rate

    lib.llama_backend_init()
    model = lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
    decode_rate(lib, model, sequences, 8, os.cpu_count() or 1)  # warm-up: first-call costs
    rate = decode_rate(lib, model, sequences, steps, os.cpu_count() or 1)
    print(json.dumps({"rate": rate, "file": lib.__file__}))


def measure(site: Path, sequences: int, steps: int, path: Path) -> float:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{root}"}
    run = subprocess.run([sys.executable, "-m", "benchmarks.llama_wheel_speed", "--worker",
                          "--sequences", str(sequences), "--steps", str(steps), "--file", str(path)],
                         capture_output=True, text=True, env=env, cwd=root, check=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    if not result["file"].startswith(str(site)):  # the wheel under test, not the environment's
        raise RuntimeError(f"measured {result['file']}, not the wheel in {site}")
    return result["rate"]


def install_wheels(wheels: dict[str, str], folder: Path) -> dict[str, Path]:
    """Each wheel installed into a folder of its own under `folder`, to be put first on the path."""
    sites = {}
    for name, wheel in wheels.items():
        sites[name] = folder / "".join(c if c.isalnum() else "_" for c in name)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(sites[name]), wheel], check=True)
    return sites


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheels", nargs="*", help="NAME=WHEEL")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--gguf", default="F16", help="llama.cpp file types, comma-separated")
    parser.add_argument("--out", type=Path, default=Path("docs/data/llama-wheel-speed.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sequences", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.sequences, args.steps, args.file)
    files = {kind: gguf_file(kind) for kind in args.gguf.split(",")}
    wheels = dict(item.split("=", 1) for item in args.wheels)
    # A row per wheel and file: "NAME" alone when only F16 is measured, as before.
    rows = {(name, kind): name if list(files) == ["F16"] else f"{name}, {kind}"
            for name in wheels for kind in files}
    rates = {row: {str(s): [] for s in SEQUENCES} for row in rows.values()}
    with tempfile.TemporaryDirectory() as tmp:
        sites = install_wheels(wheels, Path(tmp))
        for run in range(args.runs):
            for (name, kind), row in rows.items():
                for sequences in SEQUENCES:
                    rate = measure(sites[name], sequences, args.steps, files[kind])
                    rates[row][str(sequences)].append(round(rate, 1))
                    print(f"run {run + 1} {row} x{sequences}: {rate:.1f} tok/s", flush=True)
    report = {"what": f"bare llama_decode on the bundled SmolLM2-135M-Instruct GGUF ({args.gguf}), 1 "
                      "and 8 sequences one token each per call, after a 32-token prefill; a fresh "
                      "process per measurement, wheels alternating",
              "cpu": cpu_name(), "threads": os.cpu_count(), "steps": args.steps, "runs": args.runs,
              "wheels": {name: Path(w).name for name, w in wheels.items()},
              "files": {kind: path.name for kind, path in files.items()},
              "date": time.strftime("%Y-%m-%d"),
              "results": {name: {s: {"tok_s": r, "median": statistics.median(r)} for s, r in by.items()}
                          for name, by in rates.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, by in report["results"].items():
        print(name, {s: v["median"] for s, v in by.items()})


if __name__ == "__main__":
    main()
