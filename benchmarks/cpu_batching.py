"""Concurrent users on the CPU engine, through the OpenAI API: this checkout against a baseline.

Usage: python -m benchmarks.cpu_batching [--baseline DIR] [--reps 3] [--tokens 64] [--out FILE]

Each round starts `python -m deploy serve recipes/smollm2-cpu.yaml` (the default recipe: the
bundled SmolLM2-135M-Instruct; transformers bf16 until 2026-12-03, llama.cpp since) from each
checkout in turn, then measures
concurrency 1, 2, 4 and 8 with the benchmark's own client (deploy/bench/load.py: aggregate output
tok/s, TTFT and TPOT), greedy, `--tokens` tokens per answer, 4 x concurrency requests (fewer leave
the batch half-empty while the last answers finish).
--baseline is another checkout (a git worktree of an older commit), measured in the same run,
rounds alternating, so that both see the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from deploy.bench.load import run_load
from deploy.recipe.tasks import default_tasks_file, load_tasks
from deploy.serve.ports import free_port

ROOT = Path(__file__).resolve().parent.parent

RECIPE = "recipes/smollm2-cpu.yaml"
MODEL = "smollm2-cpu"
CONCURRENCY = (1, 2, 4, 8)


def serve(code: Path, port: int, log) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(code)}
    # API mode: the UI is not what is measured, and gradio's import costs seconds per start.
    recipe = Path(tempfile.mkdtemp()) / "smollm2-cpu.yaml"
    text = (code / RECIPE).read_text().replace("mode: gradio", "mode: api")
    recipe.write_text(text)
    return subprocess.Popen([sys.executable, "-m", "deploy", "serve", str(recipe), "--port", str(port)],
                            cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(url: str, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit("the server did not become ready")


def measure(code: Path, prompts: list[str], tokens: int, log) -> list[dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = serve(code, port, log)
    try:
        wait_ready(url, process)
        rows = []
        for c in CONCURRENCY:
            asyncio.run(run_load(url + "/v1", MODEL, prompts, c, c, 4))  # warm-up at this shape
            result = asyncio.run(run_load(url + "/v1", MODEL, prompts, c, 4 * c, tokens))
            rows.append(result.as_dict())
            print(f"  {code.name} c{c}: {result.output_tok_per_s:.1f} tok/s, "
                  f"TTFT p50 {result.ttft_ms['p50']:.0f} ms", flush=True)
        return rows
    finally:
        process.terminate()
        process.wait(30)


def summary(rounds: list[list[dict]]) -> list[dict]:
    out = []
    for i, c in enumerate(CONCURRENCY):
        tok = [r[i]["output_tok_per_s"] for r in rounds]
        ttft = [r[i]["ttft_ms"]["p50"] for r in rounds]
        out.append({"concurrency": c, "output_tok_per_s": _spread(tok), "ttft_p50_ms": _spread(ttft),
                    "ttft_p99_ms": _spread([r[i]["ttft_ms"]["p99"] for r in rounds]),
                    "tpot_p50_ms": _spread([r[i]["tpot_ms"]["p50"] for r in rounds])})
    return out


def _spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "runs": [round(v, 2) for v in values]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--recompute", type=Path, help="only recompute the ratios of a saved file")
    args = parser.parse_args()
    if args.recompute:
        record = json.loads(args.recompute.read_text())
        record["ratios"] = ratios(record)
        args.recompute.write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record["ratios"]))
        return
    prompts = [t.prompt for t in load_tasks(default_tasks_file())]
    codes = {"this": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    rounds: dict[str, list] = {name: [] for name in codes}
    with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as log:
        for rep in range(args.reps):
            for name, code in codes.items():
                print(f"round {rep + 1}/{args.reps}: {name}", flush=True)
                rounds[name].append(measure(code, prompts, args.tokens, log))
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (CPU only)",
        "model": "SmolLM2-135M-Instruct (real weights), transformers bf16, recipes/smollm2-cpu.yaml",
        "tokens_per_answer": args.tokens,
        "commits": {name: _commit(code) for name, code in codes.items()},
        "summary": {name: summary(r) for name, r in rounds.items()},
        "rounds": rounds,
    }
    record["ratios"] = ratios(record)
    print(json.dumps({"summary": record["summary"], "ratios": record["ratios"]}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")


def ratios(record: dict) -> dict:
    """c8 over c1 per round (both measured minutes apart on the same machine) and their median;
    the ratio of the medians beside it. On a shared 2-core machine the rounds drift, and a
    within-round ratio cancels more of the drift."""
    this = record["rounds"]["this"]
    per_round = [r[3]["output_tok_per_s"] / r[0]["output_tok_per_s"] for r in this]
    out = {"c8_over_c1_per_round": [round(x, 2) for x in per_round],
           "c8_over_c1_median_of_rounds": round(statistics.median(per_round), 2),
           "c8_over_c1_of_medians": round(record["summary"]["this"][3]["output_tok_per_s"]["median"]
                                          / record["summary"]["this"][0]["output_tok_per_s"]["median"], 2)}
    if "baseline" in record["rounds"]:
        mine = record["summary"]["this"][0]["output_tok_per_s"]["median"]
        out["c1_this_over_baseline"] = round(
            mine / record["summary"]["baseline"][0]["output_tok_per_s"]["median"], 3)
    return out


def _commit(code: Path) -> str:
    run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=code, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=code,
                           capture_output=True, text=True).stdout.strip()
    return run.stdout.strip() + ("+changes" if dirty else "")


if __name__ == "__main__":
    main()
