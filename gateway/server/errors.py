"""Every error the gateway answers, mapped to OpenAI's shape in this one place."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.errors import GatewayError
from gateway.server.handler import request_id

log = logging.getLogger("gateway.request")

_HTTP_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
}


def error_response(
    status: int,
    message: str,
    type_: str,
    code: str | None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = request_id(request)
    try:
        response = await handler(request)
    except GatewayError as exc:
        log.info("%s %s %s -> %d %s", rid, request.method, request.path, exc.status, exc.message)
        response = error_response(exc.status, exc.message, exc.type, exc.code, exc.param, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(
            exc.status,
            _http_message(exc, request),
            _HTTP_TYPES.get(exc.status, "server_error"),
            exc.reason.lower().replace(" ", "_"),
            headers=_allowed(exc),
        )
    except Exception:
        log.exception("%s %s %s: unexpected error", rid, request.method, request.path)
        response = error_response(500, f"internal error (request {rid})", "server_error", "internal_error")
    if not response.prepared:
        response.headers.setdefault("X-Request-Id", rid)
    return response


def _http_message(exc: web.HTTPException, request: web.Request) -> str:
    if exc.status == 404:
        return f"no such endpoint: {request.method} {request.path}"
    if exc.status == 405:
        return f"{request.method} is not allowed on {request.path}"
    if exc.status == 413:
        return f"the request body is too large ({exc.text})"
    return exc.text or exc.reason


def _allowed(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None
