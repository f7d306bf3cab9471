"""The errors the gateway answers itself; server/ maps them to OpenAI-shaped responses."""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """An error the gateway answers itself, in OpenAI's shape."""

    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(GatewayError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class UnsupportedEncoding(GatewayError):
    status, type, code = 415, "invalid_request_error", "unsupported_content_encoding"


class ContextLengthExceeded(GatewayError):
    status, type, code = 400, "invalid_request_error", "context_length_exceeded"


class ModelNotFound(GatewayError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class Unavailable(GatewayError):
    """Queue full, shutting down, or a model whose engine keeps failing."""

    status, type, code = 503, "server_error", "service_unavailable"


class EngineFailed(GatewayError):
    status, type, code = 502, "server_error", "engine_error"


class EngineTimeout(GatewayError):
    status, type, code = 504, "server_error", "engine_timeout"


class Unauthorized(GatewayError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class EngineRejected(GatewayError):
    """The engine refused the request while the gateway counted it: its status and words."""

    code = "engine_rejected"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = "invalid_request_error" if status < 500 else "server_error"


class NotServed(GatewayError):
    """The model's engine type does not implement the endpoint."""

    status, type, code = 501, "invalid_request_error", "not_implemented"
