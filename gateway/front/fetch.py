"""What `llm-gateway front` asks each gateway: the names it serves and its queue limit."""

from __future__ import annotations

import ipaddress
import json
import re
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
    """(host, port) of a gateway's base URL, http://host:port; ValueError otherwise.

    Nothing else: urlsplit drops tabs and newlines silently, a query or fragment would
    change the URLs asked, and the host goes into HAProxy's config as a word of its own.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if (
        not url.isascii()
        or not url.isprintable()
        or parts.scheme != "http"
        or url.rstrip("/") != f"http://{parts.netloc}"
        or parts.username is not None
        or not (_HOST_NAME.fullmatch(host) or _is_ip(host))
    ):
        raise ValueError(f"not a gateway's base URL (http://host:port): {url!r}")
    return host, parts.port or 80  # .port raises ValueError for a bad port


_HOST_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _is_ip(host: str) -> bool:
    """An IP address HAProxy reads: an IPv6 zone (fe80::1%lo) it refuses."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return "%" not in host


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
        hint = _key_hint(path, key is not None) if exc.code == 401 else ""
        raise FetchFailed(url, f"GET {path} answered {exc.code} {exc.reason}{hint}") from None
    except (OSError, ValueError) as exc:  # refused, timed out, reset; not JSON
        raise FetchFailed(url, f"GET {path} failed: {_reason(exc)}") from None
    if not isinstance(body, dict):
        raise FetchFailed(url, f"GET {path} did not answer a JSON object")
    return body


def _key_hint(path: str, key_given: bool) -> str:
    """What would get past a 401."""
    if not key_given:
        return " (give a key with --api-key-env)"
    if path == "/gateway/models":  # only this call needs more than an API key
        return " (it needs the admin key in --api-key-env, or give --maxconn)"
    return " (it refused the key from --api-key-env)"


def _reason(exc: Exception) -> str:
    return str(exc.reason) if isinstance(exc, urllib.error.URLError) else str(exc) or type(exc).__name__
