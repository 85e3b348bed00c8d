"""Tensor parallelism on a 2-GPU machine: the kit's server with engine.tp 1 and then 2, same model.

For each tp: start `python -m deploy serve` on a recipe with that tp (LMDeploy PyTorch engine,
cache ratio 0.2, session_len 4096, max_batch_size 64), send one chat completion through the
official openai client, keep GET /memory (which must list every GPU), then measure streaming
load with the benchmark's client at concurrency 1 and 64 after a warm-up wave.

Usage: python -m benchmarks.gpu_tp --model DIR --out OUT [--tp 1,2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import httpx
import openai
import yaml

from benchmarks.cold_start import kit_server
from benchmarks.gpu_overhead import measure, wait_ready


def serve_tp(model: Path, tp: int, out: Path) -> dict:
    name = f"llama7b-tp{tp}"
    recipe = out / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": name, "model": {"source": "local", "path": str(model)},
        "engine": {"backend": "lmdeploy-pytorch", "dtype": "float16", "session_len": 4096,
                   "max_batch_size": 64, "cache_max_entry_count": 0.2, "tp": tp},
        "serve": {"mode": "api"}}))
    started = time.perf_counter()
    with kit_server(recipe, out / f"{name}.log") as (url, proc):
        wait_ready(url, proc, "/health")
        ready = time.perf_counter() - started
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        answer = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16)
        memory = httpx.get(url + "/memory", timeout=60).json()
        (out / f"memory-tp{tp}.json").write_text(json.dumps(memory, indent=2))
        return {"tp": tp, "ready_s": ready,
                "one_request": {"finish_reason": answer.choices[0].finish_reason,
                                "completion_tokens": answer.usage.completion_tokens},
                "gpus_in_memory_report": [
                    {k: g[k] for k in ("index", "name", "used_bytes", "process_bytes")}
                    for g in memory["gpus"]],
                "engine_memory": {k: memory["engine"].get(k) for k in
                                  ("kv_blocks", "kv_capacity_tokens", "kv_cache_bytes", "settings")},
                "load": measure(url + "/v1", name, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tp", default="1,2")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for tp in (int(t) for t in args.tp.split(",")):
        results.append(serve_tp(args.model, tp, args.out))
        print(json.dumps(results[-1]), flush=True)
        (args.out / "tp.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
