"""Every error the server answers is an OpenAI-style JSON body: `ApiError` for the ones the kit
raises on purpose, and handlers that turn validation failures, HTTP errors and bugs into the same
shape (a bug's traceback goes to the log)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy.serve.openai.protocol import error_body

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, kind, param, code), headers


def _count(request: Request, status: int) -> None:
    ctx = getattr(request.app.state, "ctx", None)
    if ctx is not None:
        ctx.count(request.url.path, status)


async def _api_error(request: Request, exc: ApiError):
    _count(request, exc.status)
    return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)


async def _invalid(request: Request, exc: RequestValidationError):
    _count(request, 400)
    first = exc.errors()[0]
    if first["type"] == "json_invalid":  # its loc is a character offset, not a field
        return JSONResponse(error_body("The request body is not valid JSON."), status_code=400)
    param = ".".join(str(p) for p in first["loc"] if p != "body") or None
    message = f"{param or 'body'}: {first['msg']}"
    return JSONResponse(error_body(message, param=param), status_code=400)


async def _unexpected(request: Request, exc: Exception):
    log.error("unexpected error on %s", request.url.path, exc_info=exc)
    _count(request, 500)
    return JSONResponse(error_body("The server failed on this request; its log says why.",
                                   "server_error"), status_code=500)


async def _http(request: Request, exc: StarletteHTTPException):
    return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code)


def register(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Exception, _unexpected)
    app.add_exception_handler(StarletteHTTPException, _http)
