"""`deploy plan`'s memory prediction for CPU servers against the resident set of real ones.

Each setting is the default recipe (the bundled SmolLM2-135M-Instruct) with the engine, serve.mode,
engine.session_len and engine.max_batch_size changed. A setting starts `python -m deploy serve` as a
user would, waits for /health, reads GET /memory (process.rss_bytes beside the planner's
prediction), sends eight different questions at once through the openai client (up to --tokens
each; in a "filled" setting each after filler text that brings it near engine.session_len, so
the eight sessions are nearly full), reads /memory again and the process's peak resident set
(VmHWM), then stops the server. Settings alternate within each round.

The planner's measured constant, the server's own resident set without a model (BASE_BYTES in
deploy/capacity/ram_planner.py), is what the first setting of each engine and mode leaves after
the weights (and llama.cpp's KV and compute buffer): "calibrates" in the file. The other settings
of that engine and mode test the rest of the arithmetic. The base is taken at the peak resident
set, since a memory limit kills at the peak. Writes OUT (JSON) with the CPU's name and flags.

Usage: python -m benchmarks.cpu_ram_plan [--rounds 3] [--tokens 48] [--out docs/data/cpu-ram-plan.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

from benchmarks._common import ROOT, cpu_name, served, wait_health

QUESTIONS = ["What is the capital of France?", "Who wrote Hamlet?", "What is 12 times 12?",
             "Name a primary colour.", "What do bees make?", "How many legs has a spider?",
             "What is the boiling point of water?", "Which planet is the largest?"]
# A sentence of about 14 tokens: "filled" settings put enough of it before each question that the
# eight sessions are nearly full, where the planner's KV figure applies to transformers too.
FILLER = "The quick brown fox jumps over the lazy dog near the river bank. "
# name -> (engine.backend, serve.mode, engine.session_len, engine.max_batch_size, filled); the first
# of each backend and mode calibrates the planner's base, the others test it.
SETTINGS = {
    "llamacpp api 512x1 (calibrates)": ("llamacpp", "api", 512, 1, False),
    "llamacpp api 4096x8": ("llamacpp", "api", 4096, 8, False),
    "llamacpp api 8192x16": ("llamacpp", "api", 8192, 16, False),
    "llamacpp api 1024x8, sessions filled": ("llamacpp", "api", 1024, 8, True),
    "llamacpp gradio 512x1 (calibrates)": ("llamacpp", "gradio", 512, 1, False),
    "llamacpp gradio 4096x8 (the default recipe)": ("llamacpp", "gradio", 4096, 8, False),
    "transformers api 512x1 (calibrates)": ("transformers", "api", 512, 1, False),
    "transformers api 1024x8, sessions filled": ("transformers", "api", 1024, 8, True),
    "transformers api 2048x4, sessions filled": ("transformers", "api", 2048, 4, True),
    "transformers gradio 512x1 (calibrates)": ("transformers", "gradio", 512, 1, False),
}


def recipe_file(folder: Path, backend: str, mode: str, session_len: int, batch: int, _filled: bool) -> Path:
    recipe = yaml.safe_load((ROOT / "recipes/smollm2-cpu.yaml").read_text())
    recipe["engine"].update(backend=backend, session_len=session_len, max_batch_size=batch)
    recipe["serve"]["mode"] = mode
    path = folder / f"{backend}-{mode}-{session_len}x{batch}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def ask_eight(url: str, model: str, tokens: int, fill_to: int | None) -> int:
    """Eight questions at once; with `fill_to`, each after enough filler that prompt and answer come
    close to that many tokens."""
    import openai

    prefix = FILLER * max(0, (fill_to - tokens - 60) // 15) if fill_to else ""

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

    def ask(question: str) -> int:
        reply = client.chat.completions.create(model=model, max_tokens=tokens, temperature=0,
                                               messages=[{"role": "user", "content": prefix + question}])
        return reply.usage.completion_tokens

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        return sum(pool.map(ask, QUESTIONS))


def one_server(recipe: Path, tokens: int, fill_to: int | None, log: Path) -> dict:
    with served(recipe, log) as (server, url):
        wait_health(server, url, 300)
        ready = httpx.get(url + "/memory", timeout=30).json()
        answered = ask_eight(url, yaml.safe_load(recipe.read_text())["name"], tokens, fill_to)
        after = httpx.get(url + "/memory", timeout=30).json()
        return {"rss_at_ready": ready["process"]["rss_bytes"],
                "rss_after_eight": after["process"]["rss_bytes"], "peak_rss": peak_rss(server.pid),
                "tokens_answered": answered,
                "engine": after["engine"], "prediction": after["prediction"]}


def summary(runs: list[dict]) -> dict:
    """The prediction against the measured resident sets, and what this setting says of the base:
    the peak less what the planner counts beside it (for transformers only the weights: its KV and
    working memory depend on the sessions' fill, near none in the calibrating settings)."""
    p = runs[0]["prediction"]
    if runs[0]["engine"]["backend"] == "transformers":
        beside_base = p["weight_bytes"]
    else:
        beside_base = p["rss_bytes"] - p["base_bytes"]
    out = {"predicted_rss": p["rss_bytes"], "predicted_kv": p["kv_cache_bytes"],
           "predicted_working": p["working_bytes"]}
    for key in ("rss_at_ready", "rss_after_eight", "peak_rss"):
        values = [r[key] for r in runs]
        out[key] = [min(values), max(values)]
        out[key + "_error_pct"] = [round(100 * (v - p["rss_bytes"]) / v, 1) for v in out[key]]
    out["base_implied_at_peak"] = [r["peak_rss"] - beside_base for r in runs]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--only", action="append", help="a setting's name (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/data/cpu-ram-plan.json")
    args = parser.parse_args()
    settings = {k: v for k, v in SETTINGS.items() if not args.only or k in args.only}
    runs: dict[str, list] = {name: [] for name in settings}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for round_ in range(args.rounds):
            for name, spec in settings.items():
                fill_to = spec[2] if spec[4] else None
                run = one_server(recipe_file(folder, *spec), args.tokens, fill_to, folder / "server.log")
                runs[name].append(run)
                print(f"round {round_ + 1} {name}: rss {run['rss_at_ready'] >> 20} MiB at ready, "
                      f"{run['rss_after_eight'] >> 20} after eight, peak {run['peak_rss'] >> 20}; "
                      f"predicted {run['prediction']['rss_bytes'] >> 20}", flush=True)
    result = {
        "script": "python -m benchmarks.cpu_ram_plan " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "python": sys.version.split()[0],
        "note": "real weights (the bundled SmolLM2-135M-Instruct); rss in bytes; error_pct is "
                "(measured - predicted) / measured",
        "settings": {name: {"engine.backend": s[0], "serve.mode": s[1], "engine.session_len": s[2],
                            "engine.max_batch_size": s[3], "sessions_filled": s[4],
                            **summary(runs[name]), "runs": runs[name]}
                     for name, s in settings.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
