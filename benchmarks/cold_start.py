"""Cold start: from `python -m deploy serve RECIPE` to the first streamed token, as a user waits.

Usage: python -m benchmarks.cold_start RECIPE [--runs N] [--code DIR] [--json OUT] [--logs PREFIX]
--code runs another checkout's kit (e.g. a git worktree of an older commit) for a baseline measured
in the same session. Prints each run's times to listening, to /health ok and to the first token.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from deploy.serve.ports import free_port

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def kit_server(recipe: Path, log_path: Path, code: Path = ROOT):
    """`python -m deploy serve RECIPE` on a free port, its output in log_path: yields (url, proc),
    and stops it with SIGTERM (a graceful drain) on the way out."""
    port = free_port()
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "deploy", "serve", str(recipe.resolve()),
                                 "--port", str(port)], cwd=code, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def one_run(recipe: Path, code: Path, log_path: Path) -> dict:
    name = yaml.safe_load(recipe.read_text())["name"]
    started = time.perf_counter()
    listening = None
    with kit_server(recipe, log_path, code) as (url, proc):
        while True:
            if proc.poll() is not None:
                raise RuntimeError(log_path.read_text()[-3000:])
            try:
                status = httpx.get(url + "/health", timeout=5).json().get("status")
                listening = listening or time.perf_counter() - started
            except (httpx.TransportError, ValueError):
                status = None
            if status == "ok":
                break
            if status == "failed":  # the server stays up to say so; the model will not load
                raise RuntimeError(log_path.read_text()[-3000:])
            time.sleep(0.05)
        ready = time.perf_counter() - started
        body = {"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
                "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as reply:
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    break
        first_token = time.perf_counter() - started
    return {"listening_s": listening, "ready_s": ready, "first_token_s": first_token}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--code", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--logs", default="/tmp/cold-start",
                        help="each run's server log goes to LOGS-N.log (default /tmp/cold-start-N.log)")
    args = parser.parse_args()
    runs = []
    for i in range(args.runs):
        runs.append(one_run(args.recipe, args.code, Path(f"{args.logs}-{i}.log")))
        print(json.dumps(runs[-1]), flush=True)
    summary = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"median over {len(runs)} runs: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.items()))
    if args.json:
        from benchmarks._common import cpu_name

        record = {"recipe": str(args.recipe), "code": str(args.code or ROOT), "machine": cpu_name(),
                  "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "runs": runs,
                  "median": summary}
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
