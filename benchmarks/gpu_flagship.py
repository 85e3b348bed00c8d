"""The flagship recipes through the kit's own commands on a GPU, on a random-weight InternLM2-7B.

Usage: python -m benchmarks.gpu_flagship --model DIR --out DIR [--recipes w4a16-kv8,w4a16,kv8]
                                      [--backends auto,lmdeploy-pytorch] [--samples 32]

DIR is an InternLM2-7B-shaped checkpoint from `tools/make_random_internlm2.py DIR TOK --size 7b
--modeling`: it carries the project's own transformers code (tests/fixtures/internlm2_hf/), as published
InternLM2 checkpoints carry theirs, so AWQ calibration loads it with trust_remote_code.

For each of recipes/internlm2-chat-7b-{NAME}.yaml and each backend, a copy of the recipe with:
- `model:` pointed at DIR (trust_remote_code kept);
- `engine.backend` set (the recipe's `auto` picks TurboMind where it loads);
- the KV budget the planner gives the *unquantized* model on an A10 (`deploy plan --gpu A10`),
  as `engine.kv_cache_gib`, instead of the recipe's ratio of free memory. The gate's larger stage
  is that unquantized reference, so the build's peak on this card is the peak it would have on an
  A10; the planner's prediction for it is recorded beside the measurement;
- calibration with --samples x 512 local tokens (the recipe's default is 128: only time differs);
- the gate's thresholds at 0: on random weights agreement means nothing. The measured agreement
  and KL are recorded.
Then `deploy build` with nvidia-smi sampling GPU memory every 200 ms (the build's peak), and
`deploy serve`: ready time, one answer through the official openai client, and GET /memory. A
build whose gate could not score the candidate (NaN logits) is served with `--force`, the way on
its message gives.
Writes OUT/flagship.json, each recipe, the build and serve logs, and the memory traces.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks._common import serve_and_ask

ROOT = Path(__file__).resolve().parent.parent

GIB = 2**30


def variant(name: str, model: Path, backend: str, kv_gib: float | None, samples: int) -> dict:
    data = yaml.safe_load((ROOT / "recipes" / f"internlm2-chat-7b-{name}.yaml").read_text())
    data["model"] = {**{k: v for k, v in data["model"].items() if k not in ("id", "revision")},
                     "source": "local", "path": str(model)}
    engine = data["engine"]
    engine["backend"] = backend
    if kv_gib is not None:
        engine.pop("cache_max_entry_count", None)
        engine["kv_cache_gib"] = kv_gib
    quant = data.setdefault("quantization", {})
    if quant.get("weights", "none") != "none":
        quant["calibration"] = {"samples": samples, "seqlen": 512}
        quant["verify"] = {"min_top1_agreement": 0.0, "max_mean_kl": 1000.0}
    return data


def plan(recipe: Path, gpu: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "deploy", "plan", str(recipe), "--gpu", gpu, "--json"],
                          cwd=ROOT, capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode in (0, 3) else {"error": done.stderr[-1500:]}


def gpu_used_mib() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    return int(out.split()[0])


def build(recipe: Path, out: Path, tag: str) -> dict:
    trace_file = out / f"{tag}-gpu-memory.csv"
    idle = gpu_used_mib()
    with trace_file.open("w") as trace_out:
        trace = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,memory.used",
                                  "--format=csv,noheader,nounits", "-lms", "200"], stdout=trace_out)
        started = time.perf_counter()
        with (out / f"{tag}-build.log").open("w") as log:
            code = subprocess.call([sys.executable, "-m", "deploy", "build", str(recipe)], cwd=ROOT,
                                   stdout=log, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - started
        trace.terminate()
        trace.wait()
    used = [int(line.rsplit(",", 1)[1]) for line in trace_file.read_text().splitlines() if "," in line]
    return {"exit_code": code, "seconds": round(seconds, 1), "gpu_idle_mib": idle,
            "gpu_peak_mib": max(used, default=None), "samples": len(used)}


def manifest_steps(name: str) -> dict:
    home = Path(os.environ.get("XLAB_DEPLOY_HOME", Path.home() / ".cache" / "xlab-deploy"))
    path = home / "builds" / name / "manifest.json"
    if not path.is_file():
        return {}
    steps = json.loads(path.read_text())["steps"]
    return {k: {"seconds": v.get("seconds"), "outputs": v.get("outputs")} for k, v in steps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipes", default="w4a16-kv8,w4a16,kv8")
    parser.add_argument("--backends", default="auto,lmdeploy-pytorch")
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / "flagship.json"
    results = json.loads(report.read_text())["results"] if report.is_file() else []
    done = {(r["recipe"], r["backend"]) for r in results}
    for name in args.recipes.split(","):
        # The KV budget the planner gives the unquantized model on an A10 (the gate's larger stage).
        probe = args.out / f"{name}-plan-fp16.yaml"
        fp16 = variant(name, args.model, "auto", None, args.samples)
        fp16["quantization"] = {"weights": "none", "kv_cache": "none"}
        probe.write_text(yaml.safe_dump(fp16, sort_keys=False))
        a10_fp16 = plan(probe, "A10")
        kv_gib = round(a10_fp16["kv_cache_bytes"] / GIB, 2)
        for backend in args.backends.split(","):
            if (name, backend) in done:
                continue
            tag = f"{name}-{backend}"
            recipe = args.out / f"{tag}.yaml"
            data = variant(name, args.model, backend, kv_gib, args.samples)
            recipe.write_text(yaml.safe_dump(data, sort_keys=False))
            entry = {"recipe": name, "backend": backend, "kv_cache_gib": kv_gib,
                     "plan_a10_unquantized": a10_fp16, "plan_a10": plan(recipe, "A10"),
                     "build": build(recipe, args.out, tag), "steps": manifest_steps(data["name"])}
            verify = entry["steps"].get("verify", {}).get("outputs") or {}
            if entry["build"]["exit_code"] == 0:
                entry["serve"] = serve_and_ask(recipe, args.out / f"{tag}-serve.log", data["name"])
            elif verify.get("passed") is False and verify.get("top1_agreement") is None:
                # The gate could not score (NaN logits): served as its message says, with --force.
                entry["serve"] = serve_and_ask(recipe, args.out / f"{tag}-serve.log", data["name"],
                                               force=True)
                entry["serve"]["forced"] = True
            results.append(entry)
            print(tag, "build", entry["build"], "ready", entry.get("serve", {}).get("ready_s"), flush=True)
            report.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "model": str(args.model),
                                          "results": results}, indent=2))


if __name__ == "__main__":
    main()
