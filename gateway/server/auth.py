"""API keys: every endpoint but /health needs one when keys are configured."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.config.schema import GatewayConfig, ServerConfig
from gateway.errors import Unauthorized

OPEN_PATHS = frozenset({"/health"})
CONTROL_PREFIX = "/gateway/"
# The dashboard's page and files hold no data (its script asks for the key, then sends it
# to /gateway/events and the other endpoints): they load without one.
DASHBOARD = "/gateway/ui"


def required_keys(path: str, server: ServerConfig) -> tuple[str, ...]:
    """The keys that open `path`; empty when it is open."""
    if path in OPEN_PATHS or path == DASHBOARD or path.startswith(DASHBOARD + "/"):
        return ()
    if path.startswith(CONTROL_PREFIX) and server.admin_key:
        return (server.admin_key,)
    if server.api_keys:
        return (*server.api_keys, *((server.admin_key,) if server.admin_key else ()))
    return ()


def presented_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key")  # what Anthropic-style clients send


def key_matches(presented: str, keys: tuple[str, ...]) -> bool:
    """Constant time in the key's content: every configured key is compared."""
    given = presented.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode())
    return matched


def wants_the_dashboard(request: web.Request) -> bool:
    """A browser's GET /: it is sent on to the dashboard, without a key."""
    accepted = request.headers.get("Accept", "")
    return request.path == "/" and request.method in ("GET", "HEAD") and "text/html" in accepted


def auth_middleware(config: Callable[[], GatewayConfig]) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        keys = () if wants_the_dashboard(request) else required_keys(request.path, config().server)
        if keys:
            presented = presented_key(request)
            if presented is None:
                raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
            if not key_matches(presented, keys):
                raise Unauthorized("invalid API key")
        return await handler(request)

    return middleware
