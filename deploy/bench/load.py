"""Serving load through the OpenAI API at a fixed concurrency, measured as vLLM's and LMDeploy's
serving benchmarks measure it:

- TTFT: request sent -> first generated text arrives.
- TPOT: (end-to-end latency - TTFT) / (output tokens - 1), per request.
- ITL: the gap between consecutive streamed chunks, over all chunks of all requests.
- request/s and output tok/s: completed requests and generated tokens over the wall time.

`serving_rows_apart` runs the client in a child process (`python -m deploy.bench.load`, a JSON spec
on stdin, the rows on stdout), so that it never shares an interpreter with the server it measures.
Measured on the lent H200 in one call (InternLM2-7B shapes, TurboMind fp16, 64 concurrent streams,
random weights, 3 runs each): the benchmark read 4,850 (4,297-5,201) output tok/s with the client on
the serving interpreter and 5,871 (5,564-6,023) with it apart (docs/data/gpu-2026-12-03-bench-client/).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    failed: int
    seconds: float
    request_per_s: float
    output_tok_per_s: float
    ttft_ms: dict
    tpot_ms: dict
    itl_ms: dict

    def as_dict(self) -> dict:
        return asdict(self)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def at(q: float) -> float:  # nearest-rank on the sorted sample
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "mean": statistics.fmean(values) * 1000}


async def _one(client, model: str, prompt: str, max_tokens: int) -> tuple[float, float, list[float], int]:
    sent = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    tokens = 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = now
            else:
                gaps.append(now - last)
            last = now
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return (first or end) - sent, end - sent, gaps, tokens


async def run_load(base_url: str, model: str, prompts: list[str], concurrency: int, requests: int,
                   max_tokens: int, api_key: str = "unused") -> LoadResult:
    import httpx
    import openai

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600,
                                http_client=httpx.AsyncClient(limits=limits, timeout=600))
    gate = asyncio.Semaphore(concurrency)
    ttfts, tpots, itls = [], [], []
    produced = failed = 0

    async def worker(i: int) -> None:
        nonlocal produced, failed
        async with gate:
            try:
                ttft, latency, gaps, tokens = await _one(client, model, prompts[i % len(prompts)],
                                                         max_tokens)
            except Exception:
                failed += 1
                return
        ttfts.append(ttft)
        itls.extend(gaps)
        produced += tokens
        if tokens > 1:
            tpots.append((latency - ttft) / (tokens - 1))

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(requests)))
    seconds = time.perf_counter() - started
    await client.close()
    done = requests - failed
    return LoadResult(concurrency, requests, failed, seconds, done / seconds, produced / seconds,
                      percentiles(ttfts), percentiles(tpots), percentiles(itls))


def serving_rows(url: str, model: str, prompts: list[str], profile: dict) -> list[dict]:
    """Output tok/s and latencies at each of the profile's concurrencies, through the OpenAI API
    at `url`: a warm-up wave, then `repeats` runs. Several requests per slot: with one, the batch
    empties while the last answers finish, and the number says more about the tail than about the
    concurrency. Repeats give the spread that a comparison needs (report.py shows it)."""
    rows = []
    for c in profile["concurrency"]:
        asyncio.run(run_load(url, model, prompts, c, c, 4))  # warm-up
        for repeat in range(profile.get("repeats", 1)):
            load = run_load(url, model, prompts, c, c * profile["requests_per_slot"], profile["serve_tokens"])
            rows.append({**asyncio.run(load).as_dict(), "repeat": repeat, "client_pid": os.getpid()})
    return rows


def serving_rows_apart(url: str, model: str, prompts: list[str], profile: dict) -> list[dict]:
    """`serving_rows` from a child process: the client must not share the server's interpreter
    (at 64 streams the two contend for one GIL and the server looks slower than it is)."""
    spec = {"url": url, "model": model, "prompts": prompts, "profile": profile}
    done = subprocess.run([sys.executable, "-m", "deploy.bench.load"], input=json.dumps(spec),
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the serving load client failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def main() -> None:
    spec = json.loads(sys.stdin.read())
    rows = serving_rows(spec["url"], spec["model"], spec["prompts"], spec["profile"])
    sys.stdout.write(json.dumps(rows))


if __name__ == "__main__":
    main()
