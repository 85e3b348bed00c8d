"""One generation request of either API (chat or text completions), from admission to answer:
admit, check the request against the engine, tokenize, generate, answer whole or streamed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

from deploy.engines import GenerationParams, PromptTooLongError
from deploy.engines.base import joined
from deploy.serve.api_errors import ApiError
from deploy.serve.assistant import Assistant
from deploy.serve.cancel import unless_client_leaves
from deploy.serve.context import ServeContext
from deploy.serve.openai import tool_calls
from deploy.serve.openai.protocol import ChatCompletionRequest, ChatFormat, CompletionRequest
from deploy.serve.openai.streaming import observed, streamed

Body = ChatCompletionRequest | CompletionRequest


@dataclass(frozen=True)
class Prompt:
    """How a request becomes token ids: its texts (for a cheap length check), the tokenizing call,
    and the field to name when it is too long."""

    texts: list[str]
    encode: Callable[[], list[int]]
    param: str


@dataclass(frozen=True)
class Tools:
    """`used`: the prompt holds tools or earlier calls, in the model's tool format; `plan`: the
    answer may call them (tool_calls.py)."""

    plan: tool_calls.ToolPlan | None = None
    used: bool = False


async def generate(ctx: ServeContext, body: Body, request: Request,
                   prompt_of: Callable[[Assistant], Prompt], fmt: type[ChatFormat],
                   echo: str = "", tools: Tools = Tools()):
    """Admit, check, tokenize and answer one request, streamed or whole."""
    received = time.perf_counter()
    current = ctx.ready()
    slot = ctx.admit()  # no await before this: a burst never gets past serve.max_pending
    try:
        check_request(ctx, current, body, tools)
        prompt = await _tokens(current, prompt_of(current))
        form = fmt(ctx.config.name, current.token_text, echo)
        stream = observed(current.engine.stream_tokens(prompt, _params(current, body, tools)),
                          received, ctx.metrics)
        if tools.plan is not None:
            stream = tool_calls.with_calls(stream, tools.plan.parallel)
        if body.stream:
            ctx.count(request.url.path, 200)
            return streamed(slot, stream, form, body.include_usage())
        answer = await unless_client_leaves(request, joined(stream))
        if answer is None:  # the client left: generation was cancelled with it
            return Response(status_code=499)
        ctx.count(request.url.path, 200)
        return form.body(answer)
    except BaseException:  # a stream that never got its response too
        slot.release()
        raise
    finally:
        if not body.stream:
            slot.release()


def check_request(ctx: ServeContext, current: Assistant, body: Body, tools: Tools) -> None:
    """400 or 404 for what this server or its engine cannot do, naming the field."""
    if body.model != ctx.config.name:
        raise ApiError(404, f"The model {body.model!r} does not exist; this server serves "
                       f"{ctx.config.name!r}.", param="model", code="model_not_found")
    missing = [f for f in body.features() if f not in current.engine.supports]
    if missing:
        raise ApiError(400, f"{missing[0]} is not implemented by the {current.engine.name} engine; "
                       "remove it, or serve with an engine that has it (README: which engine serves "
                       "which field).", param=missing[0], code="unsupported_parameter")
    if tools.used:
        check_tools(current, body, tools.plan)


def check_tools(current: Assistant, body: Body, plan: tool_calls.ToolPlan | None) -> None:
    """400 where this model's tool format is unknown, or where a forced call would clash with the
    request's own response_format (the engine applies one guided-decoding constraint)."""
    model_type = current.engine.model_config.get("model_type")
    if tool_calls.dialect_for(model_type) is None:
        param, what = (("tools", "`tools`") if plan is not None
                       else ("messages", "the messages with tool calls or tool results"))
        raise ApiError(400, f"Tool calls need a model whose tool-call format the kit knows "
                       f"({', '.join(tool_calls.DIALECTS)}); this model is {model_type!r}. Remove "
                       f"{what}, or serve an InternLM2 model.", param=param,
                       code="unsupported_parameter")
    if plan is not None and plan.choice != "auto" and body.guided_format():
        raise ApiError(400, "response_format cannot be combined with a required or named "
                       "tool_choice: both constrain the answer. Drop one.",
                       param="response_format", code="unsupported_parameter")


async def _tokens(current: Assistant, prompt: Prompt) -> list[int]:
    session_len = current.engine.session_len
    if current.cannot_fit(prompt.texts):
        raise ApiError(400, f"The {prompt.param} is too long for engine.session_len "
                       f"({session_len} tokens): shorten it.", param=prompt.param,
                       code="context_length_exceeded")
    # Off the event loop: a long prompt takes the tokenizer a while; /health must answer.
    ids = await asyncio.to_thread(prompt.encode)
    if len(ids) >= session_len:
        raise ApiError(400, str(PromptTooLongError(len(ids), session_len)), param=prompt.param,
                       code="context_length_exceeded")
    return ids


def _params(current: Assistant, body: Body, tools: Tools) -> GenerationParams:
    return current.params(
        max_tokens=body.answer_tokens(), temperature=body.temperature, top_p=body.top_p,
        stop=body.stops(), seed=body.seed, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
        logprobs=body.logprob_count(),
        response_format=(tool_calls.guided(tools.plan) if tools.plan else None) or body.guided_format(),
        keep_special_tokens=tools.used or None,
    )
