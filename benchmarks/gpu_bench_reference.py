"""Same-run references for chosen rows of a `deploy bench` report: LMDeploy's own `lmdeploy serve
api_server` on the folders the benchmark served, and the kit's own `deploy serve` on the same
recipe, each server in its own process.

Usage (after `python -m deploy bench RECIPE --out OUT`; on the GPU machine tools/device_run.sh
bench ... does both):
  python -m benchmarks.gpu_bench_reference OUT [--settings lmdeploy-fp16,lmdeploy-fp8]
      [--servers api_server,kit]

Why both: until 2026-12-03 the benchmark's worker ran its load client on the interpreter that
served the kit, so at high concurrency client and server shared one GIL while api_server ran apart
from its client. `kit` serves the kit with `python -m deploy serve` in its own process, so the
comparison with api_server is like for like (the worker's client now runs in its own process too,
deploy/bench/load.py). For each setting, the recipe the
benchmark wrote (OUT/recipes/SETTING.yaml) gives the folder and its engine settings (api_server:
TurboMind, the same settings); the benchmark's own serving measurement (its profile and task
prompts from OUT/logs/SETTING.spec.json, its client, deploy/bench/load.py) runs against each.
Raw: OUT/reference.json; server logs OUT/logs/reference-SERVER-SETTING.log.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.gpu_overhead import wait_ready
from deploy.bench.load import serving_rows
from deploy.builder.manifest import built_model_dir
from deploy.recipe import load_recipe
from deploy.recipe.tasks import load_tasks
from deploy.serve.ports import free_port

FORMATS = {"none": "hf", "w4a16": "awq", "fp8": "fp8"}
QUANT_POLICY = {"none": 0, "int8": 8, "int4": 4}


def api_server_args(recipe, folder: Path, port: int) -> list[str]:
    """api_server's flags for what the kit's recipe asked of TurboMind."""
    engine, quant = recipe.engine, recipe.quantization
    args = [str(folder), "--backend", "turbomind", "--model-format", FORMATS[quant.weights],
            "--dtype", engine.dtype, "--quant-policy", str(QUANT_POLICY[quant.kv_cache]),
            "--cache-max-entry-count", str(engine.cache_max_entry_count),
            "--session-len", str(engine.session_len), "--max-batch-size", str(engine.max_batch_size),
            "--model-name", recipe.name, "--server-port", str(port)]
    return args + (["--trust-remote-code"] if recipe.model.trust_remote_code else [])


def start(server: str, recipe_file: Path, port: int, log) -> subprocess.Popen:
    if server == "kit":  # random weights fail the gate: served anyway, as the benchmark does
        command = ["-m", "deploy", "serve", str(recipe_file), "--port", str(port), "--force"]
    else:
        recipe = load_recipe(recipe_file)
        command = ["-m", "lmdeploy", "serve", "api_server",
                   *api_server_args(recipe, built_model_dir(recipe, force=True), port)]
    return subprocess.Popen([sys.executable, *command], stdout=log, stderr=subprocess.STDOUT)


def reference(out: Path, label: str, server: str) -> dict:
    spec = json.loads((out / "logs" / f"{label}.spec.json").read_text())
    recipe = load_recipe(Path(spec["recipe"]))
    prompts = [t.prompt for t in load_tasks(Path(spec["tasks"]))]
    port = free_port()
    started = time.perf_counter()
    with (out / "logs" / f"reference-{server}-{label}.log").open("w") as log:
        proc = start(server, Path(spec["recipe"]), port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, "/health/ready" if server == "kit" else "/v1/models")
        ready = time.perf_counter() - started
        return {"setting": label, "server": server, "ready_s": ready,
                "folder": str(built_model_dir(recipe, force=True)),
                "serving": serving_rows(url + "/v1", recipe.name, prompts, spec["profile"])}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the benchmark's output folder")
    parser.add_argument("--settings", default="lmdeploy-fp16,lmdeploy-fp8")
    parser.add_argument("--servers", default="api_server,kit", help="api_server and/or kit")
    args = parser.parse_args()
    path = args.out / "reference.json"
    done = json.loads(path.read_text()) if path.is_file() else []
    for label in args.settings.split(","):
        for server in args.servers.split(","):
            if any(r["setting"] == label and r["server"] == server for r in done):
                print(label, server, "measured earlier, kept", flush=True)
                continue
            try:
                row = reference(args.out, label, server)
            except (RuntimeError, OSError) as exc:  # recorded; the others still run
                row = {"setting": label, "server": server, "error": str(exc)}
            done.append(row)
            path.write_text(json.dumps(done, indent=1))
            c1 = [round(r["output_tok_per_s"], 1) for r in row.get("serving", []) if r["concurrency"] == 1]
            print(label, server, "c1 tok/s:", c1 or row.get("error"), flush=True)


if __name__ == "__main__":  # LMDeploy's start-up check spawns processes that re-import this
    main()
