"""Whether greedy answers stay the same under concurrency with each llama.cpp wheel: the kit's own
test (tests/engines/test_llamacpp.py::test_greedy_answers_do_not_depend_on_other_traffic: eight
questions alone, then three times all at once, through the real server and the openai client) run
with each wheel first on the path, wheels alternating.

Usage: python -m benchmarks.llama_wheel_greedy NAME=WHEEL [NAME=WHEEL ...] [--runs 3]
           [--out docs/data/llama-wheel-greedy.json]

A wheel built with other instructions can pick other kernels for a batch of eight than for one
row, and then a close call can go the other way (docs/cpu-runtimes.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import cpu_name
from benchmarks.llama_wheel_speed import install_wheels

TEST = "tests/engines/test_llamacpp.py::test_greedy_answers_do_not_depend_on_other_traffic"


def run_test(site: Path) -> dict:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{root}"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST],
                         capture_output=True, text=True, env=env, cwd=root)
    # On a failure pytest prints the two answer lists that differ; keep that part.
    diff = [line for line in run.stdout.splitlines() if line.startswith("E ")][:12]
    return {"passed": run.returncode == 0, "exit_code": run.returncode, "diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheels", nargs="+", help="NAME=WHEEL")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("docs/data/llama-wheel-greedy.json"))
    args = parser.parse_args()
    wheels = dict(item.split("=", 1) for item in args.wheels)
    results: dict[str, list[dict]] = {name: [] for name in wheels}
    with tempfile.TemporaryDirectory() as tmp:
        sites = install_wheels(wheels, Path(tmp))
        for run in range(args.runs):
            for name, site in sites.items():
                results[name].append(run_test(site))
                print(f"run {run + 1} {name}: {'passed' if results[name][-1]['passed'] else 'FAILED'}",
                      flush=True)
    report = {"what": f"{TEST}, with each wheel first on the path, wheels alternating",
              "cpu": cpu_name(), "runs": args.runs, "date": time.strftime("%Y-%m-%d"),
              "wheels": {name: Path(w).name for name, w in wheels.items()},
              "results": {name: {"passed": sum(r["passed"] for r in runs), "of": len(runs),
                                 "runs": runs} for name, runs in results.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
