"""Peak memory of the builder's quality gate: one model at a time against both at once.

Usage: python -m benchmarks.gate_memory [RECIPE] [--runs N] [--out FILE]

For a quantized recipe (default recipes/smollm2-cpu-w4.yaml, the bundled model with HQQ 4-bit on
CPU) it builds once, then measures, each in a fresh process and N times:
- `gate`: `python -m deploy build` with only the gate re-running (its answer length is nudged);
- `original alone`: the unquantized original doing the gate's reference work (the larger model);
- `both loaded`: the original and the quantized model loaded together, as the gate did before.
Peak RSS (ru_maxrss) of each process; on a GPU, also the peak of torch's allocator where the
engine runs in-process. Writes the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

GATE = """
import resource, sys
from deploy.cli import main
code = main(["build", sys.argv[1]])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""

WORK = """
import asyncio, resource, sys
from dataclasses import replace
from pathlib import Path
from deploy.builder.gate import compare_with, reference_rows
from deploy.builder.manifest import read_manifest
from deploy.engines import engine_config, load_engine
from deploy.recipe import load_recipe
from deploy.recipe.tasks import load_tasks
recipe, both = load_recipe(sys.argv[1]), sys.argv[2] == "both"
steps, gate = read_manifest(recipe)["steps"], recipe.quantization.verify
config = engine_config(recipe)
original = load_engine(replace(config, weights="none", kv_cache="none"),
                       Path(steps["fetch"]["outputs"]["model_dir"]))
quantized = load_engine(config, Path(steps["quantize"]["outputs"]["model_dir"])) if both else None
tasks = load_tasks(None, gate.prompts)
rows = asyncio.run(reference_rows(original, original.tokenizer, tasks, gate.answer_tokens))
if quantized is not None:
    asyncio.run(compare_with(quantized, rows, tasks, gate.answer_tokens))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_kib(args: list[str]) -> int:
    run = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"failed: {' '.join(args[:2])}\n{run.stderr[-3000:]}")
    return int(run.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?", type=Path, default=ROOT / "recipes" / "smollm2-cpu-w4.yaml")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "data" / "gate-memory-cpu.json")
    args = parser.parse_args()
    data = yaml.safe_load(args.recipe.read_text())
    data["name"] = f"{data['name']}-gate-memory"
    tmp = Path(tempfile.mkdtemp(prefix="gate-memory-"))
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    if subprocess.run([sys.executable, "-m", "deploy", "build", str(recipe)], cwd=ROOT).returncode:
        sys.exit("the first build failed")
    results: dict[str, list[int]] = {"gate": [], "original alone": [], "both loaded": []}
    verify = data["quantization"].setdefault("verify", {})
    base_tokens = verify.get("answer_tokens", 32)
    for run in range(args.runs):
        verify["answer_tokens"] = base_tokens + 1 + run % 2  # a new gate input: only verify re-runs
        recipe.write_text(yaml.safe_dump(data))
        results["gate"].append(peak_kib(["-c", GATE, str(recipe)]))
        results["original alone"].append(peak_kib(["-c", WORK, str(recipe), "alone"]))
        results["both loaded"].append(peak_kib(["-c", WORK, str(recipe), "both"]))
        print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1] / 1024:.0f} MiB" for k, v in results.items()))
    summary = {k: {"median_mib": round(statistics.median(v) / 1024, 1),
                   "min_mib": round(min(v) / 1024, 1), "max_mib": round(max(v) / 1024, 1)}
               for k, v in results.items()}
    record = {"recipe": str(args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT)
                            else args.recipe),
              "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
                         f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores",
              "date": time.strftime("%Y-%m-%d"), "runs": args.runs, "peak_rss_kib": results,
              "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
