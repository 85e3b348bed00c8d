"""One server process: the OpenAI-compatible API, /health, /memory and (in gradio mode) the UI at /.

The engine loads in a background thread after the server starts listening, so /health answers
`starting` at once and a slow model load never looks like a dead server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy.capacity.memory import memory_report
from deploy.engines import Delta, PromptTooLongError
from deploy.engines.base import joined
from deploy.recipe import Recipe, RecipeError
from deploy.serve import tools
from deploy.serve.assistant import Assistant
from deploy.serve.guards import BodyLimit, KeyGuard
from deploy.serve.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from deploy.serve.openai_protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    ChatFormat,
    CompletionRequest,
    TextFormat,
    error_body,
)

log = logging.getLogger(__name__)

GENERATING = ("/v1/chat/completions", "/v1/completions")  # the paths /metrics counts

# A queued stream sends an SSE comment this often until its first token: idle connections get
# cut by proxies (nginx's default read timeout is 60 s) and by impatient clients.
KEEPALIVE_SECONDS = 15.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, kind, param, code), headers


class _State:
    """The assistant once loaded, or why it is not there yet."""

    def __init__(self, assistant: Assistant | None):
        self.assistant = assistant
        self.error: str | None = None

    def ready(self) -> Assistant:
        if self.assistant is not None:
            return self.assistant
        if self.error:
            raise ApiError(500, f"The model failed to load: {self.error}", "server_error")
        raise ApiError(503, "The model is still loading; retry shortly.", "server_error",
                       headers={"Retry-After": "5"})


def create_app(recipe: Recipe, assistant: Assistant | None = None, *, ui: bool | None = None,
               loading: concurrent.futures.Future | None = None) -> FastAPI:
    """The server app. With no `assistant`, the recipe's engine loads in the background on start,
    or comes from `loading`, a load already under way in another thread."""
    state = _State(assistant)
    api_key = _api_key(recipe)

    async def lifespan(app: FastAPI):
        # The serving loop, for in-process callers (the benchmark) that must reach an engine bound
        # to it (LMDeploy's is) from another thread.
        app.state.loop = asyncio.get_running_loop()
        loader = None
        if state.assistant is None:
            loader = asyncio.create_task(_load(recipe, state, loading, metrics))
        yield
        if loader is not None and not loader.done():
            loader.cancel()
        if state.assistant is not None and assistant is None:  # close only what we opened
            state.assistant.close()

    metrics = ServerMetrics(recipe.name, {"weights": recipe.quantization.weights,
                                          "kv_cache": recipe.quantization.kv_cache}) \
        if recipe.serve.metrics else None
    if metrics is not None and assistant is not None:
        metrics.engine_loaded(assistant.engine.name)
    app = FastAPI(title=f"xlab-deploy: {recipe.name}", lifespan=lifespan)
    app.state.max_connections = recipe.serve.max_connections  # read by uvicorn_options
    app.add_middleware(BodyLimit, max_bytes=recipe.serve.max_request_bytes)
    if api_key is not None:  # added last, so it runs first: before the body is read
        app.add_middleware(KeyGuard, api_key=api_key,
                           guarded=("/v1", "/memory", "/docs", "/redoc", "/openapi.json"))
    pending = 0  # generation requests admitted and not finished; bounded by serve.max_pending

    def count(request: Request, status: int) -> None:
        if metrics is not None and request.url.path in GENERATING:
            metrics.requests.labels(str(status)).inc()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        count(request, exc.status)
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        count(request, 400)
        first = exc.errors()[0]
        if first["type"] == "json_invalid":  # its loc is a character offset, not a field
            return JSONResponse(error_body("The request body is not valid JSON."), status_code=400)
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        message = f"{param or 'body'}: {first['msg']}"
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # Every error body is OpenAI-style JSON, a bug's too; the traceback goes to the log.
        log.error("unexpected error on %s", request.url.path, exc_info=exc)
        count(request, 500)
        return JSONResponse(error_body("The server failed on this request; its log says why.",
                                       "server_error"), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code)

    @app.get("/health")
    async def health():
        if state.assistant is not None:
            # in_flight: chat requests admitted and not yet finished or cancelled; back to 0 when
            # idle, which is how the soak test (scripts/soak.py) checks that no slot leaks.
            return {"status": "ok", "model": recipe.name, "engine": state.assistant.engine.name,
                    "in_flight": pending}
        status = "failed" if state.error else "starting"
        return JSONResponse({"status": status, "model": recipe.name, "error": state.error},
                            status_code=503)

    if metrics is not None:
        @app.get("/metrics")
        async def prometheus_metrics():
            engine = state.assistant.engine if state.assistant is not None else None
            report = activity = None
            if engine is not None:
                report = await asyncio.to_thread(engine.memory)
                activity = await engine.activity()  # on this loop: LMDeploy's is bound to it
            metrics.in_flight.set(pending)
            return Response(metrics.render(report, activity), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": recipe.name, "object": "model", "created": 0, "owned_by": "xlab-deploy"}
        ]}

    @app.get("/memory")
    async def memory():
        current = state.ready()
        return await asyncio.to_thread(memory_report, current.engine, recipe)

    def release_slot() -> None:
        nonlocal pending
        pending -= 1

    async def generate(body: ChatCompletionRequest | CompletionRequest, request: Request,
                       prompt_of, fmt: type[ChatFormat], echo: str = "",
                       tool_plan: tools.ToolPlan | None = None, uses_tools: bool = False):
        """Admit, check, tokenize and answer one request of either API, streamed or whole.
        `uses_tools`: the prompt holds tools or earlier calls, rendered in the model's tool
        format; `tool_plan`: the answer may call them (serve/tools.py)."""
        nonlocal pending
        received = time.perf_counter()
        current = state.ready()
        # Admitted or refused here, with no await in between: a burst never gets past the limit.
        if pending >= recipe.serve.max_pending:
            raise ApiError(503, f"The server is busy: {pending} requests are in flight "
                           f"(serve.max_pending). Retry shortly.", "server_error",
                           headers={"Retry-After": "2"})
        pending += 1
        slot = _Slot(release_slot)
        try:
            if body.model != recipe.name:
                raise ApiError(404, f"The model {body.model!r} does not exist; this server serves "
                               f"{recipe.name!r}.", param="model", code="model_not_found")
            missing = [f for f in body.features() if f not in current.engine.supports]
            if missing:
                raise ApiError(400, f"{missing[0]} is not implemented by the "
                               f"{current.engine.name} engine; remove it, or serve with an engine "
                               "that has it (README: which engine serves which field).",
                               param=missing[0], code="unsupported_parameter")
            if uses_tools:
                check_tools(current, body, tool_plan)
            texts, encode, param = prompt_of(current)
            if current.cannot_fit(texts):
                raise ApiError(400, f"The {param} is too long for engine.session_len "
                               f"({current.engine.session_len} tokens): shorten it.",
                               param=param, code="context_length_exceeded")
            # Off the event loop: a long prompt takes the tokenizer a while; /health must answer.
            prompt = await asyncio.to_thread(encode)
            if len(prompt) >= current.engine.session_len:
                raise ApiError(400, str(PromptTooLongError(len(prompt), current.engine.session_len)),
                               param=param, code="context_length_exceeded")
            params = current.params(
                max_tokens=body.answer_tokens(), temperature=body.temperature, top_p=body.top_p,
                stop=body.stops(), seed=body.seed, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty, logprobs=body.logprob_count(),
                response_format=(tools.guided(tool_plan) if tool_plan else None) or body.guided_format(),
                keep_special_tokens=uses_tools or None,
            )
            form = fmt(recipe.name, current.token_text, echo)
            stream = _observed(current.engine.stream_tokens(prompt, params), received, metrics)
            if tool_plan is not None:
                stream = tools.with_calls(stream, tool_plan.parallel)
            if not body.stream:
                answer = await _unless_client_leaves(request, joined(stream))
                if answer is None:  # the client left: generation was cancelled with it
                    return Response(status_code=499)
                if metrics is not None:
                    metrics.requests.labels("200").inc()
                return form.body(answer)
        except BaseException:
            slot.release()
            raise
        finally:
            if not body.stream:
                slot.release()

        async def events():
            try:
                async for chunk in _sse(stream, form, body.include_usage()):
                    yield chunk
            finally:  # also when the client leaves mid-stream
                slot.release()

        if metrics is not None:
            metrics.requests.labels("200").inc()
        return _SlotResponse(
            slot, events(), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        try:
            tool_plan = tools.plan(body.tools, body.tool_choice, body.parallel_tool_calls)
        except tools.ToolError as exc:
            raise ApiError(400, f"{exc}.", param=exc.param, code="invalid_value") from None
        uses_tools = tool_plan is not None or body.has_tool_history()

        def prompt_of(current: Assistant):
            messages = current.messages(body.plain_messages())
            if uses_tools:
                messages = tools.render(messages, tool_plan)
            return [m["content"] for m in messages], lambda: current.engine.encode(messages), "messages"

        return await generate(body, request, prompt_of, ChatFormat, tool_plan=tool_plan,
                              uses_tools=uses_tools)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        # The text is continued as it is: no chat template, and no system prompt.
        def prompt_of(current: Assistant):
            return [body.prompt], lambda: current.engine.encode_text(body.prompt), "prompt"

        return await generate(body, request, prompt_of, TextFormat, body.prompt if body.echo else "")

    if ui if ui is not None else recipe.serve.mode == "gradio":
        import gradio as gr  # imported only when the UI is served: it costs seconds

        from deploy.serve.ui import build_ui

        auth = None
        if api_key is not None:  # the page and Gradio's own API ask for the key too
            def auth(username: str, password: str) -> bool:
                return hmac.compare_digest(password.encode(), api_key.encode())
        app = gr.mount_gradio_app(
            app, build_ui(recipe, state.ready), path="/", auth=auth,
            auth_message=f"Log in with any user name and the server's API key (the value of "
                          f"${recipe.serve.api_key_env}) as the password." if auth else None)
        _without_gradio_cors(app)
    return app


def check_tools(current: Assistant, body: ChatCompletionRequest, tool_plan) -> None:
    """400 where this model's tool format is unknown, or where a forced call would clash with the
    request's own response_format (the engine applies one guided-decoding constraint)."""
    model_type = current.engine.model_config.get("model_type")
    if tools.dialect_for(model_type) is None:
        param, what = (("tools", "`tools`") if tool_plan is not None
                       else ("messages", "the messages with tool calls or tool results"))
        raise ApiError(400, f"Tool calls need a model whose tool-call format the kit knows "
                       f"({', '.join(tools.DIALECTS)}); this model is {model_type!r}. Remove "
                       f"{what}, or serve an InternLM2 model.", param=param,
                       code="unsupported_parameter")
    if tool_plan is not None and tool_plan.choice != "auto" and body.guided_format():
        raise ApiError(400, "response_format cannot be combined with a required or named "
                       "tool_choice: both constrain the answer. Drop one.",
                       param="response_format", code="unsupported_parameter")


class _Slot:
    """One admitted chat request's place under serve.max_pending, given back exactly once."""

    def __init__(self, release):
        self._release = release

    def release(self) -> None:
        if self._release is not None:
            self._release, release = None, self._release
            release()


class _SlotResponse(StreamingResponse):
    """A stream that gives its slot back however it ends, also when its body was never started
    (the client left before the first read, and the generator's own `finally` never runs)."""

    def __init__(self, slot: _Slot, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.slot = slot

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


async def _unless_client_leaves(request: Request, work):
    """`work`'s result, or None if the client disconnects first; then `work` is cancelled, which
    stops the generation (a non-streaming request has no stream for the client to close)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    log.info("client left before its answer: generation cancelled")
    return None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _observed(stream: AsyncIterator[Delta], received: float,
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


async def _ticking_until_first(stream: AsyncIterator[Delta], seconds: float):
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


async def _sse(stream: AsyncIterator[Delta], form: ChatFormat,
               include_usage: bool) -> AsyncIterator[str]:
    for event in form.start():
        yield event
    content = form.content_framer()
    try:
        async for delta in _ticking_until_first(stream, KEEPALIVE_SECONDS):
            if delta is None:  # still queued: an SSE comment keeps proxies and clients waiting
                yield ": keep-alive\n\n"
                continue
            if delta.logprobs:
                yield form.piece(delta)
            elif delta.text:
                yield content(delta.text)
            if getattr(delta, "tool_calls", None):  # serve/tools.py's ToolDelta
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


async def _load(recipe: Recipe, state: _State, loading: concurrent.futures.Future | None,
                metrics: ServerMetrics | None = None) -> None:
    started = time.perf_counter()
    try:
        if loading is not None:
            state.assistant = await asyncio.wrap_future(loading)
        else:
            state.assistant = await asyncio.to_thread(Assistant.from_recipe, recipe)
        if metrics is not None:
            metrics.engine_loaded(state.assistant.engine.name)
        log.info("ready in %.1fs since the server started listening: %s on %s",
                 time.perf_counter() - started, recipe.name, state.assistant.engine.name)
    except Exception as exc:
        state.error = str(exc)
        log.error("the model failed to load: %s", exc)


def _api_key(recipe: Recipe) -> str | None:
    name = recipe.serve.api_key_env
    if name is None:
        return None
    value = os.environ.get(name)
    if not value:
        raise RecipeError(
            f"serve.api_key_env names {name}, but it is not set: export {name}=... before "
            "serving, or remove serve.api_key_env to serve without a key."
        )
    return value


class ServerThread:
    """The app served by uvicorn on a thread, on 127.0.0.1 and a port the OS picks: for in-process
    callers (the benchmark, the tests). `call` runs a coroutine on the serving loop, where an
    LMDeploy engine is bound."""

    def __init__(self, app: FastAPI):
        import threading

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


def run(recipe: Recipe, host: str | None = None, port: int | None = None, *, force: bool = False) -> None:
    """Serve until interrupted; SIGTERM and Ctrl-C let in-flight requests finish first. `force`
    serves quantized weights that failed the quality gate or never met it."""
    import uvicorn

    host = host or recipe.serve.host
    port = recipe.serve.port if port is None else port
    started = time.perf_counter()
    # Load the model while the server and the UI import (gradio alone takes seconds).
    loading = concurrent.futures.ThreadPoolExecutor(1, "load").submit(Assistant.from_recipe, recipe,
                                                                      force=force)
    app = create_app(recipe, loading=loading)
    log.info("server built in %.1fs; serving %s on http://%s:%d (mode %s)",
             time.perf_counter() - started, recipe.name, host, port, recipe.serve.mode)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30,
                **uvicorn_options(app))


def uvicorn_options(app) -> dict:
    """The connection limits (connections.py) for uvicorn serving `app`."""
    from deploy.serve.connections import guarded_protocol

    limit = getattr(app.state, "max_connections", None) or 1024
    return {"http": guarded_protocol(limit)}
