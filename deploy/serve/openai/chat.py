"""POST /v1/chat/completions: messages through the chat template, tools in the model's format."""

from __future__ import annotations

from fastapi import APIRouter, Request

from deploy.serve.api_errors import ApiError
from deploy.serve.assistant import Assistant
from deploy.serve.context import context_of
from deploy.serve.openai import tool_calls
from deploy.serve.openai.protocol import ChatCompletionRequest, ChatFormat
from deploy.serve.openai.serving import Prompt, Tools, generate


async def chat_completions(body: ChatCompletionRequest, request: Request):
    try:
        plan = tool_calls.plan(body.tools, body.tool_choice, body.parallel_tool_calls)
    except tool_calls.ToolError as exc:
        raise ApiError(400, f"{exc}.", param=exc.param, code="invalid_value") from None
    tools = Tools(plan, plan is not None or body.has_tool_history())

    def prompt_of(current: Assistant) -> Prompt:
        messages = current.messages(body.plain_messages())
        if tools.used:
            messages = tool_calls.render(messages, plan)
        return Prompt([m["content"] for m in messages], lambda: current.engine.encode(messages),
                      "messages")

    return await generate(context_of(request), body, request, prompt_of, ChatFormat, tools=tools)


def register(router: APIRouter) -> None:
    router.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
