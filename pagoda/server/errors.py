"""OpenAI-style error bodies and the exception handlers that produce them."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagoda.server.protocol import UnsupportedParameter

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """Raised by handlers; rendered as ``{"error": {...}}`` with the status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


_LOC_ROOTS = {"body", "query", "path"}
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def _is_param_part(part: Any) -> bool:
    """Field names and list indices; not pydantic's union-branch tags such as 'list[constrained-str]'."""
    return isinstance(part, int) or (part.isidentifier() and part not in _TYPE_TAGS | _LOC_ROOTS)


def _describe(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    # A union reports one error per branch; a broken bound ("too short") says more than "not a string".
    first = next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0])
    loc = [str(p) for p in first.get("loc", ()) if _is_param_part(p)]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        message = f"unsupported parameter: {param}"
    elif first.get("type") == "json_invalid":
        message, param = "the request body is not valid JSON", None  # loc is a byte offset, not a parameter
    elif param:
        message = f"{param}: {message}"
    return message, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(UnsupportedParameter)
    async def _unsupported(_: Request, exc: UnsupportedParameter) -> JSONResponse:
        return error_response(400, str(exc), exc.param, "unsupported_parameter")

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe(list(exc.errors()))
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}")
