"""What `llm-gateway front` asks each gateway: the names it serves and its queue limit."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from gateway.front.topology import Gateway, Served

FETCH_TIMEOUT = 5.0  # seconds per request to a gateway


class FetchFailed(Exception):
    """A gateway did not tell what it serves (down, refused the key, not a gateway)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")


def gateway_address(url: str) -> tuple[str, int]:
    """(host, port) of a gateway's base URL, http://host:port; ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"not a gateway's base URL (http://host:port): {url!r}")
    return parts.hostname, parts.port or 80  # .port raises ValueError for a bad port


def read_gateway(url: str, key: str | None, maxconn: int | None = None) -> Gateway:
    """The gateway at `url` as its /v1/models and /gateway/models describe it; `maxconn`
    instead of its queue_limit (then /gateway/models may refuse, e.g. without the admin key)."""
    host, port = gateway_address(url)
    listing = _get(url, "/v1/models", key)
    try:
        names = tuple(_served(entry) for entry in listing["data"])
    except (KeyError, TypeError, ValueError):
        raise FetchFailed(url, "its /v1/models answer does not list models") from None
    try:
        details = _get(url, "/gateway/models", key)
    except FetchFailed:
        if maxconn is None:
            raise
        details = {}
    if maxconn is None:
        maxconn = details.get("queue_limit")
        if not isinstance(maxconn, int) or maxconn < 1:
            raise FetchFailed(url, "/gateway/models tells no queue_limit (give --maxconn)")
    delay = details.get("shutdown_delay")
    return Gateway(
        url.rstrip("/"), host, port, names, maxconn, delay if isinstance(delay, int | float) else None
    )


def _served(entry: Any) -> Served:
    name = entry["id"]
    alias_of = (entry.get("meta") or {}).get("alias_of")
    if not isinstance(name, str) or not isinstance(alias_of, str | None):
        raise ValueError(entry)
    return Served(name, alias_of or name, entry)


def _get(url: str, path: str, key: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(url.rstrip("/") + path, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        hint = " (give a key with --api-key-env)" if exc.code == 401 else ""
        raise FetchFailed(url, f"GET {path} answered {exc.code} {exc.reason}{hint}") from None
    except (OSError, ValueError) as exc:  # refused, timed out, reset; not JSON
        raise FetchFailed(url, f"GET {path} failed: {_reason(exc)}") from None
    if not isinstance(body, dict):
        raise FetchFailed(url, f"GET {path} did not answer a JSON object")
    return body


def _reason(exc: Exception) -> str:
    return str(exc.reason) if isinstance(exc, urllib.error.URLError) else str(exc) or type(exc).__name__
