"""The server's own cost per streamed chunk, on CPU: the kit's app in front of an engine that
produces its tokens instantly, so that every microsecond measured is the server's (FastAPI,
middleware, SSE framing, the stop matcher), not the model's.

Streams REQUESTS chat completions of TOKENS chunks each, CONCURRENCY at a time, over loopback with
raw httpx (the openai client's parsing would dominate on 2 cores), and prints chunks per second of
wall time. Used to find the kit's serving overhead against LMDeploy's api_server (issue #10)
without a GPU; the GPU comparison itself is benchmarks/gpu_overhead.py.

Usage: python -m benchmarks.sse_overhead [--requests 64] [--tokens 256] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx

from deploy.engines import Delta, Engine, EngineMemory, GenerationParams
from deploy.recipe import parse_recipe
from deploy.serve.app import create_app
from deploy.serve.assistant import Assistant
from deploy.serve.config import serve_config
from deploy.serve.run import ServerThread


class InstantEngine(Engine):
    """Yields max_tokens one-word pieces with no model behind them: a measuring device only."""

    name = "instant"
    session_len = 4096
    model_config: dict = {}

    def encode(self, messages) -> list[int]:
        return [0] * 8

    async def stream_tokens(self, prompt, params: GenerationParams) -> AsyncIterator[Delta]:
        for _ in range(params.max_tokens):
            await asyncio.sleep(0)  # yield to the loop, as a real engine's stream does
            yield Delta(" word")
        yield Delta("", "length", 8, params.max_tokens)

    def memory(self) -> EngineMemory:
        return EngineMemory(device="cpu")


async def load(url: str, requests: int, tokens: int, concurrency: int) -> tuple[float, int]:
    gate = asyncio.Semaphore(concurrency)
    chunks = 0
    body = {"model": "overhead", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": tokens, "stream": True}

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal chunks
        async with gate, client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    json.loads(line[6:])
                    chunks += 1

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one(client) for _ in range(requests)))
        return time.perf_counter() - started, chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    recipe = parse_recipe({"name": "overhead", "serve": {"mode": "api", "max_tokens": args.tokens}})
    config = serve_config(recipe)
    with ServerThread(create_app(config, Assistant(config, InstantEngine()), ui=False)) as server:
        asyncio.run(load(server.url, 4, 16, 4))  # warm-up
        seconds, chunks = asyncio.run(load(server.url, args.requests, args.tokens, args.concurrency))
    print(json.dumps({"requests": args.requests, "tokens": args.tokens,
                      "concurrency": args.concurrency, "seconds": round(seconds, 3),
                      "chunks": chunks, "chunks_per_s": round(chunks / seconds)}))


if __name__ == "__main__":
    main()
