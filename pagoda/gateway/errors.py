"""Errors the gateway answers itself, in OpenAI's error body."""

from __future__ import annotations

import orjson
from aiohttp import web

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable"}


class GatewayError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.kind = kind  # the body's "type" where the status's usual one is not it (insufficient_quota)

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.kind or ERROR_TYPES.get(self.status, "api_error"),
                          "param": self.param, "code": self.code}}
        return web.Response(status=self.status, body=orjson.dumps(body), content_type="application/json",
                            headers=self.headers)
