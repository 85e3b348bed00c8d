"""Decode speed of llama.cpp wheels built with different flags, on this CPU: the check that a
shorter build (e.g. the unity build, benchmarks/llama_build_time.py) costs no speed.

Usage: python -m benchmarks.llama_wheel_speed NAME=WHEEL [NAME=WHEEL ...] [--runs 3] [--steps 96]
           [--out docs/data/llama-wheel-speed.json]

Each wheel is installed into its own folder, and each measurement runs in a fresh process with that
folder first on the path: bare `llama_decode` of 1 and of 8 sequences on the bundled F16 GGUF
(benchmarks/cpu_batch_scaling.py's loop, no sampling or HTTP), the wheels alternating every round
so that each sees the same minutes.
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


def worker(sequences: int, steps: int) -> None:
    """In the measuring process: one decode rate, printed as JSON."""
    import llama_cpp as lib

    from benchmarks.cpu_batch_scaling import decode_rate
    from deploy.builder.sources import bundled_model_dir
    from deploy.engines.llamacpp_engine import find_gguf

    lib.llama_backend_init()
    path = find_gguf(bundled_model_dir("SmolLM2-135M-Instruct", False))
    model = lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
    decode_rate(lib, model, sequences, 8, os.cpu_count() or 1)  # warm-up: first-call costs
    rate = decode_rate(lib, model, sequences, steps, os.cpu_count() or 1)
    print(json.dumps({"rate": rate, "file": lib.__file__}))


def measure(site: Path, sequences: int, steps: int) -> float:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{root}"}
    run = subprocess.run([sys.executable, "-m", "benchmarks.llama_wheel_speed", "--worker",
                          "--sequences", str(sequences), "--steps", str(steps)],
                         capture_output=True, text=True, env=env, cwd=root, check=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    if not result["file"].startswith(str(site)):  # the wheel under test, not the environment's
        raise RuntimeError(f"measured {result['file']}, not the wheel in {site}")
    return result["rate"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheels", nargs="*", help="NAME=WHEEL")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--out", type=Path, default=Path("docs/data/llama-wheel-speed.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sequences", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.sequences, args.steps)
    wheels = dict(item.split("=", 1) for item in args.wheels)
    rates = {name: {str(s): [] for s in SEQUENCES} for name in wheels}
    with tempfile.TemporaryDirectory() as tmp:
        sites = {}
        for name, wheel in wheels.items():
            sites[name] = Path(tmp) / name.replace(" ", "_")
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                            str(sites[name]), wheel], check=True)
        for run in range(args.runs):
            for name, site in sites.items():
                for sequences in SEQUENCES:
                    rate = measure(site, sequences, args.steps)
                    rates[name][str(sequences)].append(round(rate, 1))
                    print(f"run {run + 1} {name} x{sequences}: {rate:.1f} tok/s", flush=True)
    report = {"what": "bare llama_decode on the bundled SmolLM2-135M-Instruct F16 GGUF, 1 and 8 "
                      "sequences one token each per call, after a 32-token prefill; a fresh "
                      "process per measurement, wheels alternating",
              "cpu": cpu_name(), "threads": os.cpu_count(), "steps": args.steps, "runs": args.runs,
              "wheels": {name: Path(w).name for name, w in wheels.items()},
              "date": time.strftime("%Y-%m-%d"),
              "results": {name: {s: {"tok_s": r, "median": statistics.median(r)} for s, r in by.items()}
                          for name, by in rates.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, by in report["results"].items():
        print(name, {s: v["median"] for s, v in by.items()})


if __name__ == "__main__":
    main()
