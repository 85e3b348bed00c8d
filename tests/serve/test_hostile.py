"""Input an attacker (or a broken client) sends, against the real server on the real model: each
answer is a 4xx with an OpenAI error body, the key is checked before anything else, and the event
loop stays free. Items from the server issue's probe of a running server."""

from __future__ import annotations

import asyncio
import socket
import statistics
import time

import httpx
import openai
import pytest

KEY = "s3cret-value"


def chat(content="Hello", **extra) -> dict:
    return {"model": "smollm2-cpu", "messages": [{"role": "user", "content": content}],
            "max_tokens": 4, **extra}


@pytest.fixture(scope="module")
def keyed(serve_with):
    import os

    os.environ["TEST_HOSTILE_KEY"] = KEY
    with serve_with(api_key_env="TEST_HOSTILE_KEY", max_request_bytes=2 * 2**20) as live:
        yield live
    del os.environ["TEST_HOSTILE_KEY"]


def auth(key: str = KEY, scheme: str = "Bearer") -> dict:
    return {"Authorization": f"{scheme} {key}"}


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param:
        assert error["param"] == param
    return error


@pytest.mark.parametrize("body, param", [
    (chat("x\ud800y"), "messages.0.content"),  # a lone surrogate, which JSON can carry
    (chat(seed=2**64), "seed"),
    (chat(stop=["ok", "\udfff"]), "stop"),
])
def test_values_no_engine_can_take_are_a_400_that_names_the_field(keyed, body, param):
    import json

    raw = json.dumps(body)  # keeps \ud800 escaped, as a hostile client sends it
    response = httpx.post(keyed.url + "/v1/chat/completions", content=raw,
                          headers={**auth(), "content-type": "application/json"}, timeout=60)
    assert_openai_error(response, 400, param)


def test_a_vanishing_temperature_is_served_as_greedy(keyed):
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0)
    greedy = client.chat.completions.create(**chat("What is 2 + 2?", max_tokens=8, temperature=0))
    tiny = client.chat.completions.create(**chat("What is 2 + 2?", max_tokens=8, temperature=1e-40))
    assert tiny.choices[0].message.content == greedy.choices[0].message.content


def test_the_key_is_checked_before_the_body_is_read(keyed):
    # Malformed JSON without the key: 401, not 400 (the body is never parsed).
    response = httpx.post(keyed.url + "/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert_openai_error(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"
    # A 1 MiB body without the key: refused before its bytes are read. The server answers
    # while the client is still sending, so the client sees the 401 or a closed connection.
    with socket.create_connection(("127.0.0.1", int(keyed.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1048576\r\n\r\n")
        sock.settimeout(10)
        head = sock.recv(4096)  # sent nothing of the body, and the answer is already there
    assert head.startswith(b"HTTP/1.1 401")


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/redoc", "/memory", "/v1/models"])
def test_the_api_and_its_schema_need_the_key(keyed, path):
    assert_openai_error(httpx.get(keyed.url + path), 401)
    assert httpx.get(keyed.url + path, headers=auth()).status_code == 200
    assert httpx.get(keyed.url + "/health").status_code == 200  # for load balancers


def test_the_bearer_scheme_is_case_insensitive(keyed):
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert httpx.get(keyed.url + "/v1/models", headers=auth(scheme=scheme)).status_code == 200
    assert httpx.get(keyed.url + "/v1/models", headers=auth(scheme="Basic")).status_code == 401
    assert httpx.get(keyed.url + "/v1/models", headers=auth(key="wrong")).status_code == 401


def test_over_long_prompts_are_refused_without_blocking_the_loop(keyed):
    """40 prompts of 1 MiB, each refused: /health keeps answering quickly meanwhile (the check
    is by byte length, before any tokenizing, and tokenizing runs off the event loop)."""
    huge = chat("word " * (2**20 // 5))

    async def run():
        async with httpx.AsyncClient(base_url=keyed.url, timeout=120) as client:
            async def post():
                return await client.post("/v1/chat/completions", json=huge, headers=auth())

            async def probe():
                delays = []
                for _ in range(20):
                    started = time.perf_counter()
                    await client.get("/health")
                    delays.append(time.perf_counter() - started)
                    await asyncio.sleep(0.05)
                return delays

            *answers, delays = await asyncio.gather(*(post() for _ in range(40)), probe())
            return answers, delays

    answers, delays = asyncio.run(run())
    for response in answers:
        assert assert_openai_error(response, 400, "messages")["code"] == "context_length_exceeded"
    assert statistics.median(delays) < 0.5, delays


def test_a_trickling_body_gets_a_408(serve_with, monkeypatch):
    monkeypatch.setattr("deploy.serve.guards.BODY_SECONDS", 1.0)
    with serve_with() as live:
        port = int(live.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            sock.settimeout(10)
            for _ in range(3):  # a byte now and then, never the whole body
                time.sleep(0.4)
                sock.sendall(b" ")
            answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408")
    assert b'"error"' in answer


def _port(live) -> int:
    return int(live.url.rsplit(":", 1)[1])


def test_a_trickling_request_head_is_cut_off(api_server, monkeypatch):
    monkeypatch.setattr("deploy.serve.connections.HEAD_SECONDS", 1.0)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", _port(api_server))) as sock:
        sock.settimeout(10)
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        for _ in range(4):  # a header line now and then, never the blank line that ends them
            time.sleep(0.3)
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
        assert sock.recv(4096) == b""  # closed by the server, with nothing sent
    assert time.monotonic() - started < 5
    # A client that sends its head at once is served; a kept-alive connection that then idles
    # past the deadline without a next request is closed too.
    with socket.create_connection(("127.0.0.1", _port(api_server))) as sock:
        sock.settimeout(10)
        for _ in range(2):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.3)  # within the deadline: the connection is reused
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        idle = time.monotonic()
        assert sock.recv(4096) == b""
        assert 0.5 < time.monotonic() - idle < 3


def test_connections_beyond_the_cap_get_a_json_503(serve_with):
    with serve_with(max_connections=3) as live:
        held = [socket.create_connection(("127.0.0.1", _port(live))) for _ in range(3)]
        try:
            time.sleep(0.2)  # the server has accepted them
            with socket.create_connection(("127.0.0.1", _port(live))) as extra:
                extra.settimeout(10)
                refused = b""
                while chunk := extra.recv(4096):
                    refused += chunk
            head, body = refused.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 2" in head.lower()
            import json

            error = json.loads(body)["error"]
            assert error["code"] == "too_many_connections" and "max_connections" in error["message"]
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.2)
        assert httpx.get(live.url + "/health", timeout=10).status_code == 200  # the cap freed up
