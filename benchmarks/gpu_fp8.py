"""FP8 weights on Hopper through the kit: built by the kit, gated, served, against fp16, same call.

Usage (on the GPU machine, TurboMind staged unless --engine pytorch; tools/device_run.sh fp8 does
this):
  python -m benchmarks.gpu_fp8 --model DIR --out OUT [--repeats 3] [--settings fp16,fp8,fp8-kv8]
      [--reference] [--engine turbomind|pytorch]

1. `python -m deploy build` of an fp8 recipe over DIR (local source, TurboMind): the kit writes the
   blocked-FP8 checkpoint and its quality gate compares it with fp16 on TurboMind. Exit code, time
   and verify.json are kept. The fp8-kv8 setting serves that same folder.
2. Each setting is served by `python -m deploy serve` (with --force where the gate refused: random
   weights) at cache ratio 0.2, then measured at concurrency 1 (8 requests of 128 tokens, `repeats`
   rounds after a warm-up) with the benchmark's client (deploy/bench/load.py), and GET /memory is
   read beside `deploy plan --json`'s prediction.
3. With --reference, `lmdeploy serve api_server` on the same fp16 and FP8 folders, the same client.
Raw results: OUT/fp8.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from benchmarks.gpu_overhead import PROMPT, wait_ready
from deploy.bench.load import run_load
from deploy.serve.ports import free_port

# name: (weights, kv cache, engine.own_process). The -inline ones keep LMDeploy's PyTorch engine in
# the server's process (TurboMind always runs there).
SETTINGS = {"fp16": ("none", "none", True), "fp8": ("fp8", "none", True),
            "fp8-kv8": ("fp8", "int8", True), "fp16-inline": ("none", "none", False),
            "fp8-inline": ("fp8", "none", False)}


def write_recipe(out: Path, name: str, model: Path, weights: str, kv: str,
                 engine: str = "turbomind", own_process: bool = True) -> Path:
    data = {"name": f"gpu-{name}", "model": {"source": "local", "path": str(model)},
            "quantization": {"weights": weights, "kv_cache": kv,
                             "verify": {"prompts": 6, "answer_tokens": 24}},
            # fp16 weights compute in float16; FP8 ones in bfloat16, the only activations
            # TurboMind's FP8 GEMMs take (and the PyTorch engine's Gluon and DeepGEMM ones).
            "engine": {"backend": f"lmdeploy-{engine}",
                       "dtype": "bfloat16" if weights == "fp8" else "float16", "session_len": 4096,
                       "max_batch_size": 64, "cache_max_entry_count": 0.2,
                       "own_process": own_process},
            "serve": {"mode": "api", "host": "127.0.0.1"}}
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def build_fp8(recipe: Path, out: Path) -> dict:
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "deploy", "build", str(recipe)], capture_output=True,
                         text=True)
    (out / "build-fp8.log").write_text(run.stdout + run.stderr)
    from deploy.builder.manifest import work_dir
    from deploy.recipe import load_recipe

    work = work_dir(load_recipe(recipe))
    verify = work / "verify.json"
    if verify.is_file():
        shutil.copy(verify, out / "verify-fp8.json")
    folder = work / "quantized-fp8"
    return {"exit_code": run.returncode, "seconds": time.perf_counter() - started,
            "folder": str(folder),
            "folder_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
            "verify": json.loads(verify.read_text()) if verify.is_file() else None}


def rounds(url: str, model: str, repeats: int, concurrency: int = 1) -> list[dict]:
    """`repeats` rounds of streamed 128-token answers after a warm-up wave: 8 requests a round at
    concurrency 1, 128 at 64."""
    warm = (2, 16) if concurrency == 1 else (concurrency, 8)  # requests, tokens
    asyncio.run(run_load(url, model, [PROMPT], concurrency, *warm))
    requests = 8 if concurrency == 1 else 2 * concurrency
    return [{"round": r + 1,
             **asyncio.run(run_load(url, model, [PROMPT], concurrency, requests, 128)).as_dict()}
            for r in range(repeats)]


def wait_loaded(url: str, proc: subprocess.Popen) -> None:
    """Until /health/ready answers 200; an error as soon as /health says the load failed."""
    while proc.poll() is None:
        try:
            if httpx.get(url + "/health/ready", timeout=5).status_code == 200:
                return
            health = httpx.get(url + "/health", timeout=5).json()
            if health.get("status") == "failed":
                raise RuntimeError(f"the model failed to load: {health.get('error')}")
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server exited with {proc.returncode}")


def serve_kit(recipe: Path, out: Path, repeats: int, force: bool, high: bool = False) -> dict:
    port, name = free_port(), yaml.safe_load(recipe.read_text())["name"]
    plan = subprocess.run([sys.executable, "-m", "deploy", "plan", str(recipe), "--json"],
                          capture_output=True, text=True)
    started = time.perf_counter()
    with (out / f"{name}.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "deploy", "serve", str(recipe), "--port",
                                 str(port), *(["--force"] if force else [])],
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_loaded(url, proc)
        ready = time.perf_counter() - started
        row = {"server": "xlab-deploy", "recipe": name, "ready_s": ready,
               "c1": rounds(url + "/v1", name, repeats)}
        if high:
            row["c64"] = rounds(url + "/v1", name, repeats, 64)
        return {**row, "memory": httpx.get(url + "/memory").json(),
                "plan": json.loads(plan.stdout) if plan.returncode == 0 else plan.stderr[-2000:]}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def serve_lmdeploy(folder: Path, fmt: str, out: Path, repeats: int, engine: str) -> dict:
    port = free_port()
    with (out / f"api-server-{fmt}.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lmdeploy", "serve", "api_server", str(folder),
                                 "--backend", engine,
                                 # The PyTorch engine reads FP8 from the folder's quantization_config;
                                 # its --model-format takes only fp8, to quantize fp16 weights itself.
                                 *(["--model-format", fmt] if engine == "turbomind" else []),
                                 # FP8 GEMMs take bfloat16 activations (the kit's recipes say so too).
                                 *(["--dtype", "bfloat16"] if fmt == "fp8" else []),
                                 "--cache-max-entry-count", "0.2", "--session-len", "4096",
                                 "--max-batch-size", "64", "--server-port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, "/v1/models")
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        return {"server": "lmdeploy api_server", "engine": engine, "model_format": fmt,
                "c1": rounds(url + "/v1", name, repeats)}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", default="fp16,fp8,fp8-kv8")
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--engine", choices=("turbomind", "pytorch"), default="turbomind",
                        help="LMDeploy's engine for every setting (and the api_server reference)")
    parser.add_argument("--prebuilt", type=Path,
                        help="an FP8 folder the kit wrote before: served as published, no build")
    parser.add_argument("--c64", action="store_true",
                        help="the kit's servers also at concurrency 64")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": str(args.model),
                    "weights": "random", "engine": args.engine, "servers": []}
    fp8_recipe = write_recipe(args.out, "fp8", args.model, "fp8", "none", args.engine)
    if args.prebuilt:
        fp8_dir, refused, fp8_recipe = args.prebuilt, False, None
    else:
        result["build"] = build_fp8(fp8_recipe, args.out)
        print("build:", {k: v for k, v in result["build"].items() if k != "verify"}, flush=True)
        fp8_dir, refused = Path(result["build"]["folder"]), result["build"]["exit_code"] != 0
    for name in args.settings.split(","):
        weights, kv, own = SETTINGS[name]
        recipe = fp8_recipe if name == "fp8" and fp8_recipe else write_recipe(
            args.out, name, fp8_dir if weights == "fp8" else args.model, weights, kv, args.engine, own)
        try:
            result["servers"].append(serve_kit(recipe, args.out, args.repeats,
                                               refused and name == "fp8", args.c64))
        except RuntimeError as exc:  # recorded; the other settings still run
            result["servers"].append({"server": "xlab-deploy", "recipe": name, "error": str(exc)})
            print(name, "failed:", exc, flush=True)
            continue
        for level in ("c1", "c64"):
            rows = result["servers"][-1].get(level, [])
            print(name, level, [round(r["output_tok_per_s"], 1) for r in rows], flush=True)
        (args.out / "fp8.json").write_text(json.dumps(result, indent=1))
    if args.reference:
        for folder, fmt in ((args.model, "hf"), (fp8_dir, "fp8")):
            result["servers"].append(serve_lmdeploy(folder, fmt, args.out, args.repeats, args.engine))
            print("api_server", fmt, [round(r["output_tok_per_s"], 1) for r in result["servers"][-1]["c1"]],
                  flush=True)
            (args.out / "fp8.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
