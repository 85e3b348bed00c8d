"""POST /v1/completions: the text is continued as it is, with no chat template and no system
prompt."""

from __future__ import annotations

from fastapi import APIRouter, Request

from deploy.serve.assistant import Assistant
from deploy.serve.context import context_of
from deploy.serve.openai.protocol import CompletionRequest, TextFormat
from deploy.serve.openai.serving import Prompt, generate


async def completions(body: CompletionRequest, request: Request):
    def prompt_of(current: Assistant) -> Prompt:
        return Prompt([body.prompt], lambda: current.engine.encode_text(body.prompt), "prompt")

    return await generate(context_of(request), body, request, prompt_of, TextFormat,
                          body.prompt if body.echo else "")


def register(router: APIRouter) -> None:
    router.add_api_route("/v1/completions", completions, methods=["POST"])
