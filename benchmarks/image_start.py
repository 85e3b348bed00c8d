"""Container start to a healthy server, for several images side by side (alternated runs).

Usage: python -m benchmarks.image_start IMAGE [IMAGE ...] [--runs 5] [--out FILE]

Each run starts the image as built (its own CMD, recipe and port 7860, published on a free host
port), polls GET /health every 50 ms, and records the seconds from `containers.run` to the first
200; the container is then removed. Images alternate run by run, so each sees the same minutes.
Made to compare an image with the same recipe's image from an earlier commit (the kit's
`image run` adds its own CLI start to this; benchmarks/container_report.py times that).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx

from benchmarks._common import cpu_name
from deploy.serve.ports import free_port


def start_seconds(client, image: str, timeout: float = 120) -> float:
    port = free_port()
    started = time.perf_counter()
    container = client.containers.run(image, detach=True, ports={"7860/tcp": port})
    try:
        deadline = started + timeout
        while time.perf_counter() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{image} was not healthy after {timeout:.0f} s: "
                           f"{container.logs(tail=20).decode(errors='replace')}")
    finally:
        container.remove(force=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("docs/data/image-start.json"))
    args = parser.parse_args()
    import docker

    client = docker.from_env()
    seconds: dict[str, list[float]] = {image: [] for image in args.images}
    for run in range(args.runs):
        for image in args.images:
            seconds[image].append(round(start_seconds(client, image), 2))
            print(f"run {run + 1} {image}: {seconds[image][-1]} s", flush=True)
    report = {"what": "docker run to the first GET /health 200, runs alternated", "cpu": cpu_name(),
              "date": time.strftime("%Y-%m-%d"), "docker": client.version()["Version"],
              "images": {image: {"id": client.images.get(image).id,
                                 "bytes": client.images.get(image).attrs["Size"], "seconds": runs,
                                 "median": statistics.median(runs), "min": min(runs), "max": max(runs)}
                         for image, runs in seconds.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
