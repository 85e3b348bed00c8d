"""The endpoints that say how the server is: GET /health/live (the process answers),
GET /health/ready (the model is loaded and has generated), GET /health (the older combined view,
kept for compatibility), GET /memory (deploy.capacity.memory's report) and GET /metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from deploy.serve.context import context_of
from deploy.serve.metrics import CONTENT_TYPE_LATEST


async def live(request: Request):
    """200 while the process answers at all: a liveness probe must not restart a server that is
    still loading its model (that is what /health/ready is for)."""
    return {"status": "alive", "model": context_of(request).config.name}


async def ready(request: Request):
    """200 once the model is loaded and has generated a token; 503 before, with the reason."""
    ctx = context_of(request)
    if ctx.assistant is not None and ctx.warmed:
        return {"status": "ready", "model": ctx.config.name, "engine": ctx.assistant.engine.name}
    status = "failed" if ctx.error else "starting"
    return JSONResponse({"status": status, "model": ctx.config.name, "error": ctx.error},
                        status_code=503)


async def health(request: Request):
    ctx = context_of(request)
    if ctx.assistant is not None:
        # in_flight: chat requests admitted and not yet finished or cancelled; back to 0 when
        # idle, which is how the soak test (benchmarks/soak.py) checks that no slot leaks.
        return {"status": "ok", "model": ctx.config.name, "engine": ctx.assistant.engine.name,
                "in_flight": ctx.pending}
    return JSONResponse({"status": ctx.status, "model": ctx.config.name, "error": ctx.error},
                        status_code=503)


async def memory(request: Request):
    return await asyncio.to_thread(context_of(request).ready().memory)


async def metrics(request: Request):
    ctx = context_of(request)
    engine = ctx.assistant.engine if ctx.assistant is not None else None
    report = activity = None
    if engine is not None:
        report = await asyncio.to_thread(engine.memory)
        activity = await engine.activity()  # on this loop: LMDeploy's is bound to it
    ctx.metrics.in_flight.set(ctx.pending)
    return Response(ctx.metrics.render(report, activity), media_type=CONTENT_TYPE_LATEST)


def register(router: APIRouter, with_metrics: bool) -> None:
    router.add_api_route("/health", health, methods=["GET"])
    router.add_api_route("/health/live", live, methods=["GET"])
    router.add_api_route("/health/ready", ready, methods=["GET"])
    router.add_api_route("/memory", memory, methods=["GET"])
    if with_metrics:
        router.add_api_route("/metrics", metrics, methods=["GET"])
