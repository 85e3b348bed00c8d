"""InternLM2-shaped checkpoints through the kit's own server on a GPU (the lent H100).

Usage: python -m benchmarks.gpu_internlm2 --models DIR --tok TOKDIR --out DIR [--backend lmdeploy-pytorch]

For each case it makes a random-weight checkpoint with tools/make_random_internlm2.py, starts
`python -m deploy serve` on it (API mode, session_len 4096, cache ratio 0.2), asks one question
through the official openai client, reads GET /memory, and writes OUT/internlm2.json plus each
server's log. Cases:
- small, config.json with transformers 5's `rope_parameters`;
- small, without it, as published InternLM2 checkpoints are: does the engine start, and if not,
  what does the kit tell the user;
- 7b (GQA 32/8 heads, vocab 92544), with `rope_parameters`.
Random weights: the answer's text means nothing; the point is that it comes, and the memory.
With --backend lmdeploy-turbomind (after `tools/device_run.sh tm-assemble`) the servers run with
TM_LOG_LEVEL=INFO, so their logs hold TurboMind's own account of its cache budget.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks._common import serve_and_ask

ROOT = Path(__file__).resolve().parent.parent

CASES = [("small", True), ("small", False), ("7b", True)]


def make(models: Path, tok: Path, size: str, rope: bool) -> Path:
    out = models / f"internlm2-{size}{'' if rope else '-no-rope-parameters'}"
    if not (out / "config.json").is_file():
        cmd = [sys.executable, str(ROOT / "tools" / "make_random_internlm2.py"), str(out), str(tok),
               "--size", size] + ([] if rope else ["--no-rope-parameters"])
        subprocess.run(cmd, check=True)
    return out


def serve_once(model: Path, backend: str, out: Path, name: str) -> dict:
    recipe = out / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": name, "model": {"source": "local", "path": str(model)},
        "engine": {"backend": backend, "dtype": "float16", "session_len": 4096,
                   "max_batch_size": 64, "cache_max_entry_count": 0.2},
        "serve": {"mode": "api"}}))
    result = {"case": name, "model": str(model), "backend": backend,
              **serve_and_ask(recipe, out / f"{name}.log", name,
                              # TurboMind logs its KV cache budget at INFO only.
                              {"TM_LOG_LEVEL": "INFO"} if "turbomind" in backend else None)}
    text = (out / f"{name}.log").read_text(errors="replace")
    result["log_tail"] = text[-1500:]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--tok", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backend", default="lmdeploy-pytorch")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for size, rope in CASES:
        model = make(args.models, args.tok, size, rope)
        name = f"internlm2-{size}{'' if rope else '-norope'}"
        results.append(serve_once(model, args.backend, args.out, name))
        r = results[-1]
        print(name, r.get("health", {}) and r["health"].get("status"), r.get("ready_s"),
              (r.get("answer") or {}).get("usage"), flush=True)
        (args.out / "internlm2.json").write_text(json.dumps(
            {"date": time.strftime("%Y-%m-%d"), "results": results}, indent=2))


if __name__ == "__main__":
    main()
