"""Answers streamed as server-sent events: the engine's deltas framed as OpenAI chunks, keep-alive
comments while a request is queued, and the admission slot given back however a stream ends."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from deploy.engines import Delta
from deploy.serve.context import Slot
from deploy.serve.metrics import ServerMetrics
from deploy.serve.openai.protocol import SSE_DONE, ChatFormat, error_body

log = logging.getLogger(__name__)

# A queued stream sends an SSE comment this often until its first token: idle connections get
# cut by proxies (nginx's default read timeout is 60 s) and by impatient clients.
KEEPALIVE_SECONDS = 15.0


class SlotResponse(StreamingResponse):
    """A stream that gives its slot back however it ends, also when its body was never started
    (the client left before the first read, and the generator's own `finally` never runs)."""

    def __init__(self, slot: Slot, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.slot = slot

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


async def observed(stream: AsyncIterator[Delta], received: float,
                   metrics: ServerMetrics | None) -> AsyncIterator[Delta]:
    """The engine's stream, passed through; a generation that finishes is timed into metrics."""
    first = last = None
    try:
        async for delta in stream:
            if first is None and delta.text:
                first = time.perf_counter()
            last = delta
            yield delta
    finally:
        await stream.aclose()
        if metrics is not None and last is not None and last.finish_reason:
            metrics.observe(started=received, first=first, ended=time.perf_counter(),
                            prompt_tokens=last.prompt_tokens,
                            completion_tokens=last.completion_tokens)


async def ticking_until_first(stream: AsyncIterator[Delta], seconds: float):
    """The stream's deltas; while the first one is awaited (the request is queued behind others),
    a None every `seconds`. After it, deltas pass straight through (no task per token)."""
    first = asyncio.ensure_future(anext(stream))
    try:
        while not first.done():
            done, _ = await asyncio.wait({first}, timeout=seconds)
            if not done:
                yield None
    finally:
        if not first.done():  # the client left while queued
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await first
    try:
        delta = first.result()
    except StopAsyncIteration:
        return
    yield delta
    async for delta in stream:
        yield delta


async def sse(stream: AsyncIterator[Delta], form: ChatFormat,
              include_usage: bool) -> AsyncIterator[str]:
    for event in form.start():
        yield event
    content = form.content_framer()
    try:
        async for delta in ticking_until_first(stream, KEEPALIVE_SECONDS):
            if delta is None:  # still queued: an SSE comment keeps proxies and clients waiting
                yield ": keep-alive\n\n"
                continue
            if delta.logprobs:
                yield form.piece(delta)
            elif delta.text:
                yield content(delta.text)
            if getattr(delta, "tool_calls", None):  # tool_calls.py's ToolDelta
                yield form.tool_calls(delta.tool_calls)
            if delta.finish_reason:
                for event in form.end(delta, include_usage):
                    yield event
    except Exception as exc:  # headers are sent: report in-band, as OpenAI does
        log.exception("generation failed")
        yield f"data: {json.dumps(error_body(str(exc), 'server_error'))}\n\n"
    finally:
        await stream.aclose()
    yield SSE_DONE


def streamed(slot: Slot, stream: AsyncIterator[Delta], form: ChatFormat,
             include_usage: bool) -> SlotResponse:
    """The SSE response for `stream`; `slot` is given back when it ends, however it ends."""

    async def events():
        try:
            async for chunk in sse(stream, form, include_usage):
                yield chunk
        finally:  # also when the client leaves mid-stream
            slot.release()

    return SlotResponse(slot, events(), media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
