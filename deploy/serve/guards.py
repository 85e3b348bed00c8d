"""The server's outer ASGI layers, which run before any route: the API key guard (outermost, so an
unauthenticated caller makes the server read nothing) and the request-body limits (size and time).

Plain ASGI middlewares: Starlette's @app.middleware("http") wraps every streamed response in an
extra task and memory stream, a cost paid on each SSE chunk (benchmarks/sse_overhead.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time

from deploy.serve.openai.protocol import error_body

# A request body must arrive whole within this time: a client trickling a byte a second would
# otherwise hold a connection (and its buffer) for as long as it likes.
BODY_SECONDS = 15.0


class BodyLimit:
    """Refuses request bodies over `max_bytes` with a 413, whether or not they declare a length,
    and bodies that do not arrive within BODY_SECONDS with a 408."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send, int(declared))
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # Read the whole body first (at most max_bytes), so that a chunked upload without a
        # declared length is refused before the app sees any of it.
        chunks, size = [], 0
        deadline = time.monotonic() + BODY_SECONDS
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except TimeoutError:
                return await self._too_slow(send)
            if message["type"] != "http.request":
                return  # the client left
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(send, size, "at least ")
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then the disconnect, when it comes

        return await self.app(scope, replay, send)

    async def _too_slow(self, send) -> None:
        body = json.dumps(error_body(
            f"The request body did not arrive within {BODY_SECONDS:.0f} s; send it at once.")).encode()
        await send({"type": "http.response.start", "status": 408,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def _refuse(self, send, size: int, qualifier: str = "") -> None:
        body = json.dumps(error_body(
            f"The request body is {qualifier}{size} bytes; this server accepts at most "
            f"{self.max_bytes} (serve.max_request_bytes).")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class KeyGuard:
    """Refuses, with a 401 and before reading a byte of the body, every request to an API path
    that lacks `Authorization: Bearer KEY` (the scheme in any case, as RFC 7235 has it). Placed
    outside the body limit: an unauthenticated caller can make the server read nothing, and
    learns nothing about the API (not its validation errors, nor its schema at /docs)."""

    def __init__(self, app, api_key: str, guarded: tuple[str, ...]):
        self.app, self.key, self.guarded = app, api_key.encode(), guarded

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(self.guarded):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        body = json.dumps(error_body("Missing or wrong API key: send 'Authorization: Bearer KEY'.",
                                     "authentication_error", code="invalid_api_key")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


class ServedBy:
    """Adds `X-Served-By: <replica>` to every response: behind a proxy, the client (and a test of
    failover) can tell which replica answered. Plain ASGI, like the guards above."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (b"x-served-by", replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        return await self.app(scope, receive, send_with_header)
