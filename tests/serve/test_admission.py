"""Exact limits on the real server and model: serve.max_pending admits or refuses at request
start (a burst never gets past it), a non-streaming request stops generating when its client
goes, and a queued stream gets SSE keep-alive comments while it waits for its first token."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from deploy.builder.manifest import built_model_dir
from deploy.engines.transformers_engine import TransformersEngine
from deploy.serve.assistant import Assistant
from deploy.serve.config import serve_config
from deploy.serve.openai import streaming


def ask(tokens: int, stream: bool = False, content: str = "Tell me a long story about a cat.") -> dict:
    return {"model": "smollm2-cpu", "messages": [{"role": "user", "content": content}],
            "max_tokens": tokens, "stream": stream}


def test_a_burst_of_twice_the_limit_never_has_more_than_the_limit_in_flight(serve_with, assistant):
    with serve_with(max_pending=3) as live:
        async def burst():
            most = 0
            done = asyncio.Event()
            async with httpx.AsyncClient(base_url=live.url, timeout=120) as client:
                async def watch():
                    nonlocal most
                    while not done.is_set():
                        most = max(most, (await client.get("/health")).json()["in_flight"])
                        engine = assistant.engine.memory().settings
                        most = max(most, engine["batched_now"] + engine["waiting_now"])
                        await asyncio.sleep(0.01)

                watcher = asyncio.create_task(watch())
                posts = [client.post("/v1/chat/completions", json=ask(24, stream=i % 2 == 1))
                         for i in range(6)]
                answers = await asyncio.gather(*posts)
                done.set()
                await watcher
            return answers, most

        answers, most = asyncio.run(burst())
    statuses = sorted(a.status_code for a in answers)
    assert set(statuses) <= {200, 503} and statuses.count(503) >= 1, statuses
    assert all(a.headers.get("retry-after") for a in answers if a.status_code == 503)
    assert most <= 3


def test_a_non_streaming_request_stops_when_its_client_goes(recipe, assistant, api_server):
    async def leave_early():
        async with httpx.AsyncClient(base_url=api_server.url, timeout=1.5) as client:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes
                await client.post("/v1/chat/completions", json=ask(400))
        left = time.perf_counter()
        async with httpx.AsyncClient(base_url=api_server.url, timeout=10) as client:
            while time.perf_counter() - left < 10:
                health = (await client.get("/health")).json()
                if health["in_flight"] == 0 and assistant.engine.memory().settings["batched_now"] == 0:
                    return time.perf_counter() - left
                await asyncio.sleep(0.05)
        return None

    # 400 tokens take this CPU 10 s or more; the row must be freed long before.
    assert asyncio.run(leave_early()) is not None


@pytest.fixture(scope="module")
def one_at_a_time(recipe, assistant):
    engine = TransformersEngine(built_model_dir(recipe), max_batch_size=1)
    yield Assistant(serve_config(recipe), engine)
    engine.close()


def test_a_queued_stream_gets_keep_alive_comments(serve_with, one_at_a_time, monkeypatch):
    monkeypatch.setattr(streaming, "KEEPALIVE_SECONDS", 0.2)
    with serve_with(one_at_a_time) as live:
        async def queued_stream():
            async with httpx.AsyncClient(base_url=live.url, timeout=120) as client:
                busy = asyncio.create_task(client.post("/v1/chat/completions", json=ask(60)))
                await asyncio.sleep(0.5)  # the one row is taken
                lines = []
                async with client.stream("POST", "/v1/chat/completions",
                                         json=ask(4, stream=True, content="Hi")) as response:
                    async for line in response.aiter_lines():
                        lines.append(line)
                await busy
                return lines

        lines = asyncio.run(queued_stream())
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data:") and
                      '"content":""' not in line.replace(" ", ""))
    assert any(line == ": keep-alive" for line in lines[:first_data])
    assert lines[-1] == "data: [DONE]" or lines[-2] == "data: [DONE]"
