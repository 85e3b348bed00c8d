"""GPU proof of the LMDeploy engine: the kit's own server, one request and /memory per setting.

For each setting (fp16, KV int8, KV int4, AWQ W4A16) it writes a recipe, starts
`python -m deploy serve` with lmdeploy-pytorch at one fixed cache ratio, sends one chat request
through the official `openai` client, reads GET /memory and stops the server. The AWQ model is made
first with the kit's own quantizer (local calibration text, no hub). Results go to OUT/*.json and a
Markdown table OUT/lmdeploy.md.

Usage (on a GPU machine, from the repo root):
  python -m benchmarks.gpu_lmdeploy --model DIR --out OUT [--settings fp16,kv8,kv4,awq] [--ratio 0.2]
See ../shared/device/README.md for building random-weight Llama models on the lent H100.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from deploy.serve.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "fp16": {"weights": "none", "kv_cache": "none"},
    "kv8": {"weights": "none", "kv_cache": "int8"},
    "kv4": {"weights": "none", "kv_cache": "int4"},
    "awq": {"weights": "w4a16", "kv_cache": "none"},
    "awq-kv8": {"weights": "w4a16", "kv_cache": "int8"},
}


def recipe_for(name: str, model: Path, setting: dict, ratio: float, session_len: int) -> dict:
    return {
        "name": f"gpu-{name}",
        "model": {"source": "local", "path": str(model)},
        "quantization": {"weights": setting["weights"], "kv_cache": setting["kv_cache"],
                         "calibration": {"samples": 32, "seqlen": 512}},
        "engine": {"backend": "lmdeploy-pytorch", "dtype": "float16", "session_len": session_len,
                   "max_batch_size": 64, "cache_max_entry_count": ratio},
        "serve": {"mode": "api", "host": "127.0.0.1"},
    }


def ensure_awq(model: Path, awq_dir: Path, out: Path) -> float | None:
    if (awq_dir / "config.json").is_file():
        return None
    from deploy.builder.quantize import awq_quantize
    from deploy.recipe import parse_recipe

    recipe = parse_recipe(recipe_for("awq", model, SETTINGS["awq"], 0.2, 4096))
    started = time.perf_counter()
    awq_quantize(recipe, model, awq_dir)
    seconds = time.perf_counter() - started
    (out / "awq_time.json").write_text(json.dumps({"awq_seconds": seconds}))
    return seconds


def run_setting(name: str, model: Path, ratio: float, session_len: int, out: Path) -> dict:
    import httpx
    import openai

    recipe_path = out / f"recipe-{name}.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe_for(name, model, SETTINGS[name], ratio, session_len)))
    port = free_port()
    log_path = out / f"serve-{name}.log"
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "deploy", "serve", str(recipe_path),
                                 "--port", str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    result: dict = {"setting": name, **SETTINGS[name], "cache_max_entry_count": ratio}
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {log_path.read_text()[-3000:]}")
            try:
                health = httpx.get(url + "/health", timeout=5).json()
            except httpx.TransportError:
                health = {}
            if health.get("status") == "ok":
                break
            if health.get("status") == "failed" or time.perf_counter() - started > 400:
                raise RuntimeError(f"server did not become ready: {health}")
            time.sleep(1)
        result["ready_seconds"] = round(time.perf_counter() - started, 1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        t0 = time.perf_counter()
        reply = client.chat.completions.create(
            model=f"gpu-{name}", messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=128, temperature=0)
        result["request_seconds"] = round(time.perf_counter() - t0, 2)
        result["completion_tokens"] = reply.usage.completion_tokens
        result["finish_reason"] = reply.choices[0].finish_reason
        result["memory"] = httpx.get(url + "/memory", timeout=30).json()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    return result


def table(results: list[dict]) -> str:
    base = next((r for r in results if r["setting"] == "fp16"), None)
    base_tokens = base["memory"]["engine"]["kv_capacity_tokens"] if base else None
    rows = [
        "| setting | weights | KV cache | ratio | served (tokens, finish) | ready s | weights GiB "
        "| KV blocks | KV tokens | KV x fp16 | KV GiB | sessions | GPU used MiB | process MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m, e = r["memory"], r["memory"]["engine"]
        gpu = m["gpus"][0] if m["gpus"] else {}
        ratio = (e["kv_capacity_tokens"] / base_tokens) if base_tokens else float("nan")
        share = gpu.get("process_bytes")
        share_text = f"{share / 2**20:,.0f}" if share else "n/a"
        rows.append(
            f"| {r['setting']} | {r['weights']} | {r['kv_cache']} | {r['cache_max_entry_count']} "
            f"| {r['completion_tokens']}, {r['finish_reason']} | {r['ready_seconds']} "
            f"| {e['weight_bytes'] / 2**30:.2f} | {e['kv_blocks']} | {e['kv_capacity_tokens']:,} "
            f"| {ratio:.2f} | {e['kv_cache_bytes'] / 2**30:.2f} | {e['sessions_that_fit']} "
            f"| {gpu.get('used_bytes', 0) / 2**20:,.0f} | {share_text} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="fp16 model folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--settings", default="fp16,kv8,kv4,awq")
    parser.add_argument("--ratio", type=float, default=0.2, help="cache_max_entry_count for all")
    parser.add_argument("--session-len", type=int, default=4096)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    awq_dir = args.model.parent / (args.model.name + "-awq")
    results = []
    for name in args.settings.split(","):
        model = args.model
        if SETTINGS[name]["weights"] == "w4a16":
            seconds = ensure_awq(args.model, awq_dir, args.out)
            if seconds is not None:
                print(f"[gpu_lmdeploy] AWQ took {seconds:.0f}s", flush=True)
            model = awq_dir
        print(f"[gpu_lmdeploy] {name} ...", flush=True)
        results.append(run_setting(name, model, args.ratio, args.session_len, args.out))
        print(f"[gpu_lmdeploy] {name}: {json.dumps(results[-1]['memory']['engine'])}", flush=True)
    gpu = results[0]["memory"]["gpus"][0]["name"] if results[0]["memory"]["gpus"] else "no GPU"
    text = (f"Measured {datetime.date.today()} on {gpu} by benchmarks/gpu_lmdeploy.py "
            f"(model {args.model.name}, LMDeploy PyTorch engine).\n\n{table(results)}\n")
    (args.out / "lmdeploy.md").write_text(text)
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
