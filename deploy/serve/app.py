"""The server app, assembled in one readable function: the context, the guards, each endpoint
family's routes and (in gradio mode) the UI at /.

The engine loads in the background after the server starts listening, so /health/live answers at
once and a slow model load never looks like a dead server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import os
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, FastAPI

from deploy.errors import RecipeError
from deploy.serve import api_errors, health
from deploy.serve.assistant import Assistant
from deploy.serve.config import ServeConfig
from deploy.serve.context import ServeContext
from deploy.serve.guards import BodyLimit, KeyGuard, ServedBy
from deploy.serve.openai import chat, completions, models


def create_app(config: ServeConfig, assistant: Assistant | None = None, *, ui: bool | None = None,
               load: Callable[[], Assistant] | None = None,
               loading: concurrent.futures.Future | None = None) -> FastAPI:
    """The server app for a loaded `assistant`, or one that loads in the background on start:
    from `loading` (a load already under way in another thread) or by calling `load`."""
    if assistant is None and load is None and loading is None:
        raise ValueError("create_app needs an assistant, a load function or a loading future")
    ctx = ServeContext(config, assistant)
    api_key = _api_key(config)
    app = FastAPI(title=f"xlab-deploy: {config.name}", lifespan=_lifespan(ctx, load, loading))
    app.state.ctx = ctx
    app.state.max_connections = config.max_connections  # read by run.uvicorn_options
    app.add_middleware(BodyLimit, max_bytes=config.max_request_bytes)
    if api_key is not None:  # added last, so it runs first: before the body is read
        app.add_middleware(KeyGuard, api_key=api_key,
                           guarded=("/v1", "/memory", "/docs", "/redoc", "/openapi.json"))
    replica = os.environ.get("XLAB_DEPLOY_REPLICA")
    if replica:  # behind a proxy: which replica answered (the swarm stack and the chart set it)
        app.add_middleware(ServedBy, replica=replica)
    api_errors.register(app)
    router = APIRouter()
    health.register(router, with_metrics=ctx.metrics is not None)
    models.register(router)
    chat.register(router)
    completions.register(router)
    app.include_router(router)
    if ui if ui is not None else config.mode == "gradio":
        app = _with_ui(app, ctx, api_key)
    return app


def _lifespan(ctx: ServeContext, load, loading):
    async def lifespan(app: FastAPI):
        # The serving loop, for in-process callers (the benchmark) that must reach an engine bound
        # to it (LMDeploy's is) from another thread.
        app.state.loop = asyncio.get_running_loop()
        given = ctx.assistant
        loader = asyncio.create_task(ctx.load(load, loading)) if given is None else None
        yield
        if loader is not None and not loader.done():
            loader.cancel()
        if ctx.assistant is not None and given is None:  # close only what we opened
            ctx.assistant.close()

    return lifespan


def _with_ui(app: FastAPI, ctx: ServeContext, api_key: str | None) -> FastAPI:
    import gradio as gr  # imported only when the UI is served: it costs seconds

    from deploy.serve.ui import build_ui

    auth = None
    if api_key is not None:  # the page and Gradio's own API ask for the key too
        def auth(username: str, password: str) -> bool:
            return hmac.compare_digest(password.encode(), api_key.encode())
    app = gr.mount_gradio_app(
        app, build_ui(ctx.config, ctx.ready), path="/", auth=auth,
        auth_message=f"Log in with any user name and the server's API key (the value of "
                      f"${ctx.config.api_key_env}) as the password." if auth else None)
    _without_gradio_cors(app)
    return app


def _without_gradio_cors(app: FastAPI) -> None:
    """Gradio's app, mounted at the root, answers every CORS preflight its routes or ours did not
    claim, allowing localhost origins with credentials: a page on any local port could then call
    the API, and Gradio's API with the login cookie. The page needs no CORS (it is served from
    the same origin), so its CORS middleware is removed: CORS stays off, as in API mode."""
    for route in app.routes:
        sub = getattr(route, "app", None)
        if getattr(route, "path", None) == "" and hasattr(sub, "user_middleware"):
            sub.user_middleware = [m for m in sub.user_middleware
                                   if m.cls.__name__ != "CustomCORSMiddleware"]
            sub.middleware_stack = None  # rebuilt without it on the next request


def _api_key(config: ServeConfig) -> str | None:
    """The key from the variable serve.api_key_env names, or from the file that `NAME_FILE` names
    (a swarm or Kubernetes secret mounted as a file)."""
    name = config.api_key_env
    if name is None:
        return None
    value = os.environ.get(name)
    if not value and os.environ.get(f"{name}_FILE"):
        path = os.environ[f"{name}_FILE"]
        try:
            value = Path(path).read_text().strip()
        except OSError as exc:
            raise RecipeError(f"{name}_FILE names {path}, which cannot be read ({exc.strerror}): "
                              f"mount the secret there, or set {name} itself.") from None
    if not value:
        raise RecipeError(
            f"serve.api_key_env names {name}, but it is not set: export {name}=... (or {name}_FILE="
            "a file holding it) before serving, or remove serve.api_key_env to serve without a key."
        )
    return value
