"""Limits on connections, below the app: how many may be open, and how long a request head may take.

uvicorn bounds neither: a client that sends its headers a byte at a time, or opens thousands of
idle sockets, holds them for as long as it likes (seen: more than 30 s, with no cap). Its own
`limit_concurrency` answers a plain-text 503 only once a request arrives, and counts nothing while
headers trickle. This protocol, uvicorn's HTTP/1.1 one with two checks added, closes a connection
whose request head is not complete HEAD_SECONDS after it opened (or after its previous response),
and refuses connections beyond the cap at once with an OpenAI-style JSON 503.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_SECONDS = 10.0  # from connecting (or the last response) to a complete request head


def _refusal(message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "server_error", "param": None,
                                 "code": "too_many_connections"}}).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nretry-after: 2\r\nconnection: close\r\n\r\n")
    return head.encode() + body


class GuardedH11(H11Protocol):
    max_connections = 1024  # set per server by `guarded_protocol`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            transport.write(_refusal(f"The server has {self.max_connections} connections open "
                                     "(serve.max_connections): retry shortly, or reuse one."))
            transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # h11 leaves IDLE once the whole request head has arrived: the deadline is met.
        if self._head_timer is not None and self.conn.their_state is not h11.IDLE:
            self._head_timer.cancel()
            self._head_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this kept-alive connection has the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(HEAD_SECONDS, self._head_too_slow)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(max_connections: int) -> type[GuardedH11]:
    """The protocol class for one server, with its connection cap."""
    return type("GuardedH11", (GuardedH11,), {"max_connections": max_connections})
