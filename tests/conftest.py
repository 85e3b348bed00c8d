"""Shared fixtures: the real bundled model, loaded once, and real servers on ephemeral ports."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = ROOT / "recipes" / "smollm2-cpu.yaml"


@pytest.fixture(scope="session")
def recipe():
    from deploy.recipe import load_recipe

    return load_recipe(DEFAULT_RECIPE)


@pytest.fixture(scope="session")
def assistant(recipe):
    from deploy.assistant import Assistant

    with Assistant.from_recipe(recipe) as loaded:
        yield loaded


class LiveServer:
    """A uvicorn server in a thread on 127.0.0.1 with a port the OS picked."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def api_server(recipe, assistant):
    from deploy.server import create_app

    with LiveServer(create_app(recipe, assistant, ui=False)) as live:
        yield live


@pytest.fixture(scope="session")
def gradio_server(recipe, assistant, tmp_path_factory):
    from deploy.server import create_app

    with LiveServer(create_app(recipe, assistant, ui=True)) as live:
        live.screenshot_path = tmp_path_factory.mktemp("ui") / "gradio.png"
        yield live


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
