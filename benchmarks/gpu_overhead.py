"""The kit's serving overhead against `lmdeploy serve api_server`, and cold start, on one GPU.

Both servers get the same model and settings (LMDeploy PyTorch engine, cache ratio 0.2,
session_len 4096, max_batch_size 64) and the same client (deploy/bench/load.py, the benchmark's):
streaming chat completions at concurrency 1 and 64, a warm-up wave and then --repeats rounds each.
Then the kit's server is started --cold-starts more times from cold to time start -> first token
(these skip LMDeploy's environment check, which the first start recorded as passed).

Usage: python -m benchmarks.gpu_overhead --model DIR --out OUT [--kit-only] [--repeats N] [--cold-starts N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from benchmarks.cold_start import free_port, kit_server, one_run
from deploy.bench.load import run_load

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Write a long essay about the history of the printing press and its effect on Europe."


def wait_ready(url: str, proc: subprocess.Popen, path: str) -> None:
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            reply = httpx.get(url + path, timeout=5)
            if reply.status_code == 200:
                return
            if path == "/health" and reply.json().get("status") == "failed":
                raise RuntimeError(f"the model failed to load: {reply.json().get('error')}")
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def measure(base_url: str, model: str, repeats: int) -> list[dict]:
    """`repeats` rounds at each concurrency after one warm-up wave, each round a row with its
    `round` number, so a comparison has its spread."""
    rows = []
    for concurrency, requests in ((1, 8), (64, 128)):
        asyncio.run(run_load(base_url, model, [PROMPT], concurrency, concurrency, 8))  # warm-up
        for round_ in range(repeats):
            result = asyncio.run(run_load(base_url, model, [PROMPT], concurrency, requests, 128))
            rows.append({"round": round_ + 1, **result.as_dict()})
    return rows


def lmdeploy_server(model: Path, out: Path, repeats: int) -> dict:
    port = free_port()
    log = (out / "lmdeploy-api-server.log").open("w")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lmdeploy", "serve", "api_server", str(model),
                             "--backend", "pytorch", "--cache-max-entry-count", "0.2",
                             "--session-len", "4096", "--max-batch-size", "64", "--server-port",
                             str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, "/v1/models")
        ready = time.perf_counter() - started
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        return {"server": "lmdeploy api_server", "ready_s": ready,
                "load": measure(url + "/v1", name, repeats)}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)


def kit_measured(recipe: Path, out: Path, repeats: int) -> dict:
    started = time.perf_counter()
    with kit_server(recipe, out / "kit-server.log") as (url, proc):
        wait_ready(url, proc, "/health")
        ready = time.perf_counter() - started
        return {"server": "xlab-deploy", "ready_s": ready,
                "load": measure(url + "/v1", yaml.safe_load(recipe.read_text())["name"], repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kit-only", action="store_true",
                        help="skip the api_server baseline (e.g. to re-time the kit's cold start)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="measured rounds per server and concurrency (default 3)")
    parser.add_argument("--cold-starts", type=int, default=2,
                        help="cold starts of the kit's server timed afterwards (default 2)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = args.out / "overhead.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "overhead", "model": {"source": "local", "path": str(args.model)},
        "engine": {"backend": "lmdeploy-pytorch", "dtype": "float16", "session_len": 4096,
                   "max_batch_size": 64, "cache_max_entry_count": 0.2},
        "serve": {"mode": "api"}}))
    results = {}
    if not args.kit_only:
        results["lmdeploy"] = lmdeploy_server(args.model, args.out, args.repeats)
        print(json.dumps(results["lmdeploy"]), flush=True)
    # The first start runs the environment check and records it as passed.
    results["kit"] = kit_measured(recipe, args.out, args.repeats)
    print(json.dumps(results["kit"]), flush=True)
    results["cold_start"] = [one_run(recipe, ROOT, args.out / f"cold-{i}.log")
                             for i in range(args.cold_starts)]
    print(json.dumps(results["cold_start"]), flush=True)
    (args.out / "overhead.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
