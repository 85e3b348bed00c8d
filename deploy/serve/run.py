"""Running the server app: `run` serves a recipe until interrupted; `ServerThread` serves an app
on a thread for in-process callers (the benchmark, the tests)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import TYPE_CHECKING

from fastapi import FastAPI

from deploy.serve.app import create_app
from deploy.serve.assistant import Assistant
from deploy.serve.config import serve_config

if TYPE_CHECKING:
    from deploy.recipe import Recipe

log = logging.getLogger(__name__)


def run(recipe: Recipe, host: str | None = None, port: int | None = None, *, force: bool = False) -> None:
    """Serve until interrupted; SIGTERM and Ctrl-C let in-flight requests finish first. `force`
    serves quantized weights that failed the quality gate or never met it."""
    import uvicorn

    config = serve_config(recipe)
    host = host or config.host
    port = config.port if port is None else port
    started = time.perf_counter()
    # Load the model while the server and the UI import (gradio alone takes seconds).
    loading = concurrent.futures.ThreadPoolExecutor(1, "load").submit(Assistant.from_recipe, recipe,
                                                                      force=force)
    app = create_app(config, loading=loading)
    log.info("server built in %.1fs; serving %s on http://%s:%d (mode %s)",
             time.perf_counter() - started, config.name, host, port, config.mode)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30,
                **uvicorn_options(app))


def uvicorn_options(app) -> dict:
    """The connection limits (connections.py) for uvicorn serving `app`."""
    from deploy.serve.connections import guarded_protocol

    limit = getattr(app.state, "max_connections", None) or 1024
    return {"http": guarded_protocol(limit)}


class ServerThread:
    """The app served by uvicorn on a thread, on 127.0.0.1 and a port the OS picks: for in-process
    callers (the benchmark, the tests). `call` runs a coroutine on the serving loop, where an
    LMDeploy engine is bound."""

    def __init__(self, app: FastAPI):
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    **uvicorn_options(app)))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.app.state.loop).result()

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
