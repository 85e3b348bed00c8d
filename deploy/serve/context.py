"""`ServeContext`: runtime dependencies and state shared by the serving endpoints (as LMDeploy's
`ServerContext`): the serving config, the assistant once loaded (or why not yet), the metrics,
and admission under serve.max_pending. One per app, at `app.state.ctx`."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable

from fastapi import Request

from deploy.serve.api_errors import ApiError
from deploy.serve.assistant import Assistant
from deploy.serve.config import ServeConfig
from deploy.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)

GENERATING = ("/v1/chat/completions", "/v1/completions")  # the paths /metrics counts


class Slot:
    """One admitted request's place under serve.max_pending, given back exactly once."""

    def __init__(self, release: Callable[[], None]):
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        if self._release is not None:
            self._release, release = None, self._release
            release()


class ServeContext:
    def __init__(self, config: ServeConfig, assistant: Assistant | None = None):
        self.config = config
        self.assistant = assistant
        self.error: str | None = None  # why the model failed to load, if it did
        # A model handed in ready is taken as able to generate; one loaded here first answers a
        # one-token warm-up (GET /health/ready waits for it).
        self.warmed = assistant is not None
        self.pending = 0  # generation requests admitted and not finished
        self.metrics = ServerMetrics(config.name, config.quantization) if config.metrics else None
        if self.metrics is not None and assistant is not None:
            self.metrics.engine_loaded(assistant.engine.name)

    @property
    def status(self) -> str:
        """ok (loaded), failed (the load raised) or starting."""
        return "ok" if self.assistant is not None else "failed" if self.error else "starting"

    def ready(self) -> Assistant:
        """The loaded assistant, or the 503 (loading) or 500 (failed) that says why not."""
        if self.assistant is not None:
            return self.assistant
        if self.error:
            raise ApiError(500, f"The model failed to load: {self.error}", "server_error")
        raise ApiError(503, "The model is still loading; retry shortly.", "server_error",
                       headers={"Retry-After": "5"})

    def admit(self) -> Slot:
        """A place for one generation request, or a 503 when serve.max_pending are in flight.
        Called with no await before it in the handler, so a burst never gets past the limit."""
        if self.pending >= self.config.max_pending:
            raise ApiError(503, f"The server is busy: {self.pending} requests are in flight "
                           f"(serve.max_pending). Retry shortly.", "server_error",
                           headers={"Retry-After": "2"})
        self.pending += 1
        return Slot(self._release)

    def _release(self) -> None:
        self.pending -= 1

    def count(self, path: str, status: int) -> None:
        if self.metrics is not None and path in GENERATING:
            self.metrics.requests.labels(str(status)).inc()

    async def load(self, load: Callable[[], Assistant] | None,
                   loading: concurrent.futures.Future | None) -> None:
        """Load the model in the background: from `loading` (a load already under way in another
        thread) or by calling `load`. Failures are kept as `error` for /health to report."""
        started = time.perf_counter()
        try:
            if loading is not None:
                assistant = await asyncio.wrap_future(loading)
            else:
                assistant = await asyncio.to_thread(load)
            self.assistant = assistant
            if self.metrics is not None:
                self.metrics.engine_loaded(assistant.engine.name)
            log.info("loaded in %.1fs since the server started listening: %s on %s",
                     time.perf_counter() - started, self.config.name, assistant.engine.name)
            await assistant.achat([{"role": "user", "content": "Hi"}], max_tokens=1)
            self.warmed = True
            log.info("ready in %.1fs (a first token generated)", time.perf_counter() - started)
        except Exception as exc:
            self.error = str(exc)
            log.error("the model failed to load: %s", exc)


def context_of(request: Request) -> ServeContext:
    return request.app.state.ctx
