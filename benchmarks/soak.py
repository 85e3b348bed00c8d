"""Soak test of the real server process (issue #8): many mixed requests, some abandoned mid-stream.

Starts `python -m deploy serve RECIPE` (API mode, serve.max_pending set below the client's
concurrency so that the queue limit is reached), then sends REQUESTS chat completions, CONCURRENCY
at a time, over loopback: half streaming, half not, and a share of the streams dropped by the client
after a few chunks. A 503 must carry Retry-After; the client then waits that long and tries again,
as a well-behaved client does. Afterwards it checks:

- the server process never died, and its log has no traceback;
- every response was a 200 or a 503 with Retry-After (no other status, no broken stream);
- every stream that was not dropped ended with a finish_reason and [DONE];
- /health's in_flight returns to 0 (no slot leaked by a dropped stream) and a new request is served;
- the server's RSS (children included) grows less than 5% over the soak's second half: a leak grows
  with every request, while caches that fill once (oneDNN's per-shape kernels, the allocator's
  arenas, the batch's KV buffers) grow in the first half and level off;
- SIGTERM ends the process cleanly.

Writes the figures as JSON (--out) and exits 1 if a check failed. `make soak` runs it on the
default CPU recipe; docs/reliability.md records the figures.

Usage: python -m benchmarks.soak RECIPE [--requests 1000] [--concurrency 32] [--max-pending 24]
       [--disconnect 0.1] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import yaml

from deploy.serve.ports import free_port

ROOT = Path(__file__).resolve().parent.parent

PROMPTS = [json.loads(line)["prompt"] for line in
           (ROOT / "deploy" / "data" / "tasks.jsonl").read_text().splitlines() if line.strip()]


def rss(pid: int) -> int:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


async def one(client: httpx.AsyncClient, model: str, rng: random.Random, drop_share: float,
              tally: Counter, deadline_s: float = 600) -> None:
    body = {"model": model, "max_tokens": rng.randint(2, 16), "temperature": 0,
            "messages": [{"role": "user", "content": rng.choice(PROMPTS)}]}
    stream = rng.random() < 0.5
    # Drops are drawn from all requests (drop_share of them), so they are all streams.
    drop = rng.random() < drop_share
    stream = stream or drop
    body["stream"] = stream
    started = time.monotonic()
    while True:
        if not stream:
            reply = await client.post("/v1/chat/completions", json=body)
            if reply.status_code == 200:
                tally["complete"] += 1 if reply.json()["choices"][0]["finish_reason"] else 0
                tally["non_stream_ok"] += 1
                return
        else:
            async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
                if reply.status_code == 200:
                    await _read_stream(reply, drop, rng, tally)
                    return
                await reply.aread()
        if reply.status_code != 503:
            tally[f"status_{reply.status_code}"] += 1
            return
        if "retry-after" not in reply.headers:
            tally["503_without_retry_after"] += 1
            return
        tally["503"] += 1
        if time.monotonic() - started > deadline_s:
            tally["gave_up"] += 1
            return
        await asyncio.sleep(float(reply.headers["retry-after"]))


async def _read_stream(reply: httpx.Response, drop: bool, rng: random.Random, tally: Counter) -> None:
    keep = rng.randint(1, 3)  # a dropping client leaves after this many events
    events, finish = 0, None
    async for line in reply.aiter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            tally["stream_ok" if finish else "stream_done_without_finish"] += 1
            tally["complete"] += 1 if finish else 0
            return
        data = json.loads(line[6:])
        if "error" in data:
            tally["stream_error_event"] += 1
            return
        if data["choices"]:
            finish = data["choices"][0]["finish_reason"] or finish
        events += 1
        if drop and events >= keep:
            tally["dropped"] += 1
            return  # leaving the context closes the connection mid-stream
    tally["stream_cut_by_server"] += 1


async def soak(url: str, model: str, requests: int, concurrency: int, drop: float,
               seed: int = 0) -> dict:
    rng = random.Random(seed)
    tally: Counter = Counter()
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:

        async def guarded(i: int) -> None:
            async with gate:
                try:
                    await one(client, model, random.Random(rng.random()), drop, tally)
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    tally[f"client_error_{type(exc).__name__}"] += 1

        started = time.perf_counter()
        await asyncio.gather(*(guarded(i) for i in range(requests)))
        return {"seconds": round(time.perf_counter() - started, 1), "tally": dict(tally)}


def wait_health(url: str, proc: subprocess.Popen, until, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            health = httpx.get(url + "/health", timeout=5).json()
            if until(health):
                return health
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"/health did not reach the expected state in {timeout:.0f}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-pending", type=int, default=24,
                        help="serve.max_pending for the run: below --concurrency to reach the limit")
    parser.add_argument("--disconnect", type=float, default=0.1, help="share of dropped streams")
    parser.add_argument("--out", type=Path, default=Path("soak.json"))
    args = parser.parse_args()

    data = yaml.safe_load(args.recipe.read_text())
    data.setdefault("serve", {}).update(mode="api", max_pending=args.max_pending)
    workdir = Path(tempfile.mkdtemp(prefix="xlab-soak-"))
    recipe, log_path = workdir / "soak.yaml", workdir / "server.log"
    recipe.write_text(yaml.safe_dump(data))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "deploy", "serve", str(recipe), "--port",
                                 str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    result: dict = {"recipe": str(args.recipe), "requests": args.requests,
                    "concurrency": args.concurrency, "max_pending": args.max_pending,
                    "disconnect_share": args.disconnect, "machine": _machine()}
    try:
        wait_health(url, proc, lambda h: h.get("status") == "ok", 300)
        # Warm-up at the soak's own concurrency: the engine batches concurrent requests, and the
        # first full batch grows the process once (KV buffers, allocator arenas). RSS is compared
        # from there, so that what grows is what the soak's requests leave behind.
        asyncio.run(soak(url, data["name"], 2 * args.concurrency, args.concurrency, 0.0))
        time.sleep(2)
        result["rss_before_bytes"] = rss(proc.pid)
        print(f"soak: {args.requests} requests, {args.concurrency} at a time ...", flush=True)
        first = asyncio.run(soak(url, data["name"], args.requests // 2, args.concurrency,
                                 args.disconnect))
        time.sleep(2)
        result["rss_mid_bytes"] = rss(proc.pid)
        second = asyncio.run(soak(url, data["name"], args.requests - args.requests // 2,
                                  args.concurrency, args.disconnect, seed=1))
        result["seconds"] = round(first["seconds"] + second["seconds"], 1)
        result["tally"] = dict(Counter(first["tally"]) + Counter(second["tally"]))
        idle = wait_health(url, proc, lambda h: h.get("in_flight") == 0, 60)
        result["in_flight_after"] = idle["in_flight"]
        after = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": data["name"], "max_tokens": 4,
            "messages": [{"role": "user", "content": "Hello"}]})
        result["request_after_status"] = after.status_code
        time.sleep(2)
        result["rss_after_bytes"] = rss(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            result["exit_code"] = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            result["exit_code"] = "killed after 60 s"
    logs = log_path.read_text()
    result["server_log_tracebacks"] = logs.count("Traceback")
    result["checks"] = _checks(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if all(result["checks"].values()) else 1


# Every other tally key (status_NNN, 503_without_retry_after, client_error_*, stream_cut_by_server,
# stream_error_event, stream_done_without_finish, gave_up) is a failure.
EXPECTED_OUTCOMES = {"complete", "non_stream_ok", "stream_ok", "dropped", "503"}


def _checks(r: dict) -> dict:
    tally = r.get("tally", {})
    served = tally.get("stream_ok", 0) + tally.get("non_stream_ok", 0) + tally.get("dropped", 0)
    mid, after = r.get("rss_mid_bytes"), r.get("rss_after_bytes")
    return {
        "every request served, completed or dropped by its client": served == r["requests"],
        "no status other than 200 and 503 with Retry-After": set(tally) <= EXPECTED_OUTCOMES,
        "in_flight back to 0": r.get("in_flight_after") == 0,
        "a request after the soak is served": r.get("request_after_status") == 200,
        "RSS grows less than 5% over the second half": bool(mid and after and after <= mid * 1.05),
        "no traceback in the server log": r["server_log_tracebacks"] == 0,
        "clean exit on SIGTERM": r.get("exit_code") in (0, -15),
    }


def _machine() -> str:
    import os
    import platform

    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


if __name__ == "__main__":
    sys.exit(main())
