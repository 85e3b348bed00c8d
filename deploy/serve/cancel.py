"""Cancellation: a generation stops when its client leaves."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import Request

log = logging.getLogger(__name__)


async def unless_client_leaves(request: Request, work):
    """`work`'s result, or None if the client disconnects first; then `work` is cancelled, which
    stops the generation (a non-streaming request has no stream for the client to close)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    log.info("client left before its answer: generation cancelled")
    return None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
