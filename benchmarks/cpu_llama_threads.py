"""How llama.cpp's compute threads wait for each other, and what it costs the kit's engine on this
CPU: four ways, measured in the engine and (with --api) through the kit's HTTP API.

- "ggml threads, per step": the kit's build and engine as shipped. llama.cpp built without OpenMP
  makes its worker threads anew inside every `llama_decode`, and they meet at a spinning barrier
  after each operation.
- "ggml threadpool, kept": the same build with one threadpool attached for the context's life
  (benchmarks/ggml_threadpool.py; llama.cpp's CLI does this).
- "OpenMP, passive wait" and "OpenMP, default wait": a wheel built with `GGML_OPENMP=ON`
  (`python -m benchmarks.llama_build_time --variants "kit flags + OpenMP" --keep DIR`), whose
  threads sleep at a barrier (OMP_WAIT_POLICY=passive) or spin a while and then sleep (libgomp's
  default), so a thread that loses its core to the server's event loop costs a wake-up, not a
  spinning partner.

Each variant runs in a process of its own (its wheel first on the path), variants alternating in
each round. In the engine: `--requests` task prompts at concurrency 8 after a warm-up wave, then 4
at concurrency 1, 128 tokens at most, answers ending where the model ends them. With --api, the
openai load client in a child process (deploy/bench/load.py) at concurrency 8, 2 requests a slot.
Writes OUT (JSON) with the CPU's name and flags.

Usage: python -m benchmarks.cpu_llama_threads [--openmp-wheel WHEEL] [--rounds 3] [--api] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import ROOT, cpu_name

API = {"concurrency": [8], "requests_per_slot": 2, "serve_tokens": 128, "repeats": 1}
# name -> (wheel: None for the kit's, kept threadpool, extra environment)
VARIANTS = {"ggml threads, per step": (None, False, {}),
            "ggml threadpool, kept": (None, True, {}),
            "OpenMP, passive wait": ("openmp", False, {"OMP_WAIT_POLICY": "passive"}),
            "OpenMP, default wait": ("openmp", False, {})}


async def in_engine(assistant, prompts: list[str], concurrency: int, requests: int) -> dict:
    from deploy.engines import GenerationParams

    gate = asyncio.Semaphore(concurrency)
    params = GenerationParams(max_tokens=API["serve_tokens"])
    produced = 0

    async def one(i: int) -> None:
        nonlocal produced
        async with gate:
            answer = await assistant.achat([{"role": "user", "content": prompts[i % len(prompts)]}], params)
            produced += answer.completion_tokens

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    seconds = time.perf_counter() - started
    return {"concurrency": concurrency, "requests": requests, "tokens": produced,
            "seconds": round(seconds, 3), "output_tok_per_s": round(produced / seconds, 1)}


def worker(spec: dict) -> dict:
    """In the variant's own process: the engine, then (with api) the server in front of it."""
    import llama_cpp

    from deploy.bench.load import serving_rows_apart
    from deploy.recipe import load_recipe
    from deploy.recipe.tasks import default_tasks_file, load_tasks
    from deploy.serve.app import create_app
    from deploy.serve.assistant import Assistant
    from deploy.serve.config import serve_config
    from deploy.serve.run import ServerThread

    if spec["kept_threadpool"]:
        from benchmarks.ggml_threadpool import attach_to_batcher

        attach_to_batcher(os.cpu_count() or 1)
    prompts = [t.prompt for t in load_tasks(default_tasks_file())]
    recipe = load_recipe(spec["recipe"])
    assistant = Assistant.from_recipe(recipe)
    try:
        with ServerThread(create_app(serve_config(recipe), assistant, ui=False)) as server:
            server.call(in_engine(assistant, prompts, 8, 8))  # warm-up
            rows = {"engine": [server.call(in_engine(assistant, prompts, 8, spec["requests"])),
                               server.call(in_engine(assistant, prompts, 1, 4))]}
            if spec["api"]:
                rows["api"] = serving_rows_apart(server.url + "/v1", recipe.name, prompts, API)
    finally:
        assistant.close()
    return {**rows, "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip()}


def run_variant(name: str, args, sites: dict[str, Path]) -> dict:
    wheel, kept, env = VARIANTS[name]
    path = [str(sites[wheel])] if wheel else []
    spec = {"recipe": str(args.recipe), "requests": args.requests, "api": args.api, "kept_threadpool": kept}
    done = subprocess.run([sys.executable, "-m", "benchmarks.cpu_llama_threads", "--worker"],
                          input=json.dumps(spec), capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env, "PYTHONPATH": os.pathsep.join([*path, str(ROOT)])})
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(runs: list[dict]) -> dict:
    out: dict = {}
    for run in runs:
        for where in ("engine", "api"):
            for row in run.get(where, []):
                key = f"{where} c{row['concurrency']}"
                rates = out.setdefault(run["variant"], {}).setdefault(key, [])
                rates.append(round(row["output_tok_per_s"], 1))
    return {name: {key: [min(v), max(v)] for key, v in rows.items()} for name, rows in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes/smollm2-cpu.yaml")
    parser.add_argument("--openmp-wheel", type=Path,
                        help="a llama-cpp-python wheel built with GGML_OPENMP=ON")
    parser.add_argument("--variants", help="names separated by semicolons (default: all that can run)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16, help="requests at concurrency 8, in the engine")
    parser.add_argument("--api", action="store_true", help="also measure concurrency 8 through the HTTP API")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/data/cpu-llama-threads.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(sys.stdin.read()))))
        return
    names = args.variants.split(";") if args.variants else [
        n for n, (wheel, _, _) in VARIANTS.items() if wheel is None or args.openmp_wheel]
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        sites = {}
        if args.openmp_wheel:
            from benchmarks.llama_wheel_speed import install_wheels

            sites = install_wheels({"openmp": str(args.openmp_wheel)}, Path(folder))
        for round_ in range(args.rounds):
            for name in names:
                run = {"round": round_, "variant": name, **run_variant(name, args, sites)}
                runs.append(run)
                print(json.dumps({"round": round_, "variant": name, **summary([run])[name]}), flush=True)
    args.out.write_text(json.dumps({
        "script": "benchmarks/cpu_llama_threads.py", "recipe": str(args.recipe.relative_to(ROOT)),
        "machine": cpu_name(), "cores": os.cpu_count(), "api_profile": API,
        "openmp_wheel": args.openmp_wheel.name if args.openmp_wheel else None,
        "variants": {n: {"wheel": VARIANTS[n][0] or "the kit's", "kept_threadpool": VARIANTS[n][1],
                         "env": VARIANTS[n][2]} for n in names},
        "summary_output_tok_per_s": summary(runs), "runs": runs}, indent=2))
    print(json.dumps(summary(runs), indent=2))


if __name__ == "__main__":
    main()
