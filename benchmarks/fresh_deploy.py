"""A new user's first `make deploy`: a fresh clone, with empty pip and kit caches, to the default
recipe's Gradio page loading and a chat answer coming back.

Usage: python -m benchmarks.fresh_deploy [--runs 3] [--out docs/data/fresh-deploy.json]

Each run clones this checkout's HEAD into an empty folder and runs `make deploy PORT=...` there
with PIP_CACHE_DIR and XLAB_DEPLOY_HOME pointing at empty folders, so that nothing built or
downloaded by an earlier install is reused (llama.cpp is compiled from source each time). Packages
come from this machine's configured pip indexes (`pip config list`), which a new user's network may
serve slower or faster. Recorded from `make` starting: the install done (the venv's marker file),
`serving ... on http://...` printed, the page at / answering 200 and holding Gradio's app, and the
first answer to a chat request through the OpenAI-compatible API. Then the server is stopped and
the folders removed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks._common import cpu_name
from deploy.serve.ports import free_port

ROOT = Path(__file__).resolve().parents[1]


def first_answer(url: str, deadline: float) -> float:
    """When (monotonic) a chat request through the OpenAI-compatible API first got an answer."""
    body = {"model": "smollm2-cpu", "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8, "temperature": 0}
    while time.monotonic() < deadline:
        try:
            reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
            if reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]:
                return time.monotonic()
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("no chat answer within the run's limit")


def page_ready(url: str, deadline: float) -> float:
    while time.monotonic() < deadline:
        try:
            page = httpx.get(url + "/", timeout=10)
            if page.status_code == 200 and "gradio" in page.text.lower():
                return time.monotonic()
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the Gradio page did not load within the run's limit")


def one_run(limit_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        clone, pip_cache, home = Path(tmp) / "clone", Path(tmp) / "pip-cache", Path(tmp) / "home"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        port = free_port()
        env = {**os.environ, "PIP_CACHE_DIR": str(pip_cache), "XLAB_DEPLOY_HOME": str(home)}
        env.pop("VIRTUAL_ENV", None)
        env.pop("CMAKE_ARGS", None)  # the Makefile's own flags, as for a new user
        log = (Path(tmp) / "make.log").open("w")
        started = time.monotonic()
        proc = subprocess.Popen(["make", "deploy", f"PORT={port}"], cwd=clone, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = started + limit_s
        marks: dict[str, float] = {}
        try:
            url = f"http://127.0.0.1:{port}"
            while "installed_s" not in marks and time.monotonic() < deadline:
                if (clone / ".venv" / ".installed").exists():
                    marks["installed_s"] = time.monotonic() - started
                if proc.poll() is not None:
                    raise RuntimeError(f"make deploy exited with {proc.returncode}: "
                                       f"{(Path(tmp) / 'make.log').read_text()[-2000:]}")
                time.sleep(0.5)
            marks["page_s"] = page_ready(url, deadline) - started
            marks["first_answer_s"] = first_answer(url, deadline) - started
            text = (Path(tmp) / "make.log").read_text()
            marks["serving_line"] = next((line for line in text.splitlines() if "serving " in line), None)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in marks.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--limit", type=float, default=900, help="seconds a run may take")
    parser.add_argument("--out", type=Path, default=Path("docs/data/fresh-deploy.json"))
    args = parser.parse_args()
    runs = []
    for number in range(args.runs):
        runs.append(one_run(args.limit))
        print(f"run {number + 1}: {runs[-1]}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    report = {"what": "fresh clone, empty pip cache and kit cache, `make deploy` to the Gradio page "
                      "and a chat answer through the API; seconds from `make` starting",
              "commit": commit, "cpu": cpu_name(), "cores": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d"), "runs": runs,
              "median": {k: statistics.median(r[k] for r in runs)
                         for k in ("installed_s", "page_s", "first_answer_s")}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["median"]))


if __name__ == "__main__":
    main()
