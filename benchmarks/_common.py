"""One start of `python -m deploy serve RECIPE` as a user would make it, for the GPU scripts
(gpu_internlm2.py, gpu_flagship.py): how long until /health says ok, one greedy answer through the
official openai client, GET /memory, then the server is stopped. The server's output goes to LOG."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from deploy.engines.hardware import cpu_name  # noqa: F401  (re-exported: the benchmarks name the CPU)
from deploy.serve.ports import free_port

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def served(recipe: Path, log_path: Path, env: dict | None = None, force: bool = False):
    """`python -m deploy serve RECIPE` on a free port, its output to LOG; yields (process, url) and
    stops it on the way out (terminate, then kill after 60 s)."""
    port = free_port()
    with log_path.open("w") as log:
        server = subprocess.Popen([sys.executable, "-m", "deploy", "serve", str(recipe), "--port", str(port),
                                   *(["--force"] if force else [])],
                                  cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        try:
            yield server, f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()


def wait_health(server: subprocess.Popen, url: str, limit_s: float) -> dict | None:
    """GET /health until it says ok or failed, the server exits, or `limit_s` passes; its last reply."""
    started, health = time.perf_counter(), None
    while time.perf_counter() - started < limit_s and server.poll() is None:
        try:
            health = httpx.get(url + "/health", timeout=2).json()
            if health.get("status") in ("ok", "failed"):
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return health


def serve_and_ask(recipe: Path, log_path: Path, model_name: str, env: dict | None = None,
                  limit_s: float = 300, force: bool = False) -> dict:
    started = time.perf_counter()
    result: dict = {}
    with served(recipe, log_path, env, force) as (server, url):
        health = wait_health(server, url, limit_s)
        result.update(health=health, exit_code=server.poll(),
                      ready_s=round(time.perf_counter() - started, 1))
        if health and health.get("status") == "ok":
            import openai

            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            answer = client.chat.completions.create(
                model=model_name, messages=[{"role": "user", "content": "Hello, who are you?"}],
                max_tokens=32, temperature=0)
            result["answer"] = {"text": answer.choices[0].message.content,
                                "finish_reason": answer.choices[0].finish_reason,
                                "usage": answer.usage.model_dump()}
            result["memory"] = httpx.get(url + "/memory", timeout=30).json()
    return result


def bundled_gguf(model_dir: Path, file_type: str) -> Path:
    """The bundled model's GGUF of llama.cpp's `file_type` (Q8_0, Q4_1, ...) beside `model_dir` (its
    F16 folder), written once by the builder's own gguf_quantize, as the smollm2-cpu-q4 recipe
    builds it."""
    from deploy.builder.gguf import gguf_quantize
    from deploy.engines.llamacpp_engine import find_gguf

    folder = model_dir.parent / f"SmolLM2-135M-Instruct-{file_type.lower()}-bench"
    if not folder.is_dir():
        gguf_quantize(file_type, model_dir, folder)
    return find_gguf(folder)
