"""`deploy plan` for a hub recipe with no network: seconds from start to exit, N runs.

Usage: python -m benchmarks.offline_plan [--code DIR] [--runs N] [--out FILE]
--code runs another checkout's kit (a git worktree of an older commit) for a baseline measured in
the same session. The recipe is recipes/internlm2-chat-7b-fp16.yaml (model.source huggingface),
and HF_HUB_OFFLINE is unset: the kit has to find out by itself that the hub is out of reach.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "recipes/internlm2-chat-7b-fp16.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", type=Path, default=ROOT)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["PYTHONPATH"] = str(args.code)
    seconds = []
    for _ in range(args.runs):
        started = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "deploy", "plan", RECIPE, "--gpu", "A10"],
                             cwd=args.code, env=env, capture_output=True, text=True)
        seconds.append(time.perf_counter() - started)
        if run.returncode not in (0, 3):
            sys.exit(run.stderr[-2000:])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.code, capture_output=True,
                            text=True).stdout.strip()
    record = {"code": str(args.code), "commit": commit,
              "date": time.strftime("%Y-%m-%d"), "seconds": [round(s, 2) for s in seconds],
              "median_s": round(statistics.median(seconds), 2)}
    print(json.dumps(record))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
