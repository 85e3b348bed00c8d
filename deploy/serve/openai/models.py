"""GET /v1/models: the one model this server serves, under the recipe's name."""

from __future__ import annotations

from fastapi import APIRouter, Request

from deploy.serve.context import context_of


async def models(request: Request):
    name = context_of(request).config.name
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "xlab-deploy"}
    ]}


def register(router: APIRouter) -> None:
    router.add_api_route("/v1/models", models, methods=["GET"])
