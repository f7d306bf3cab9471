"""What `llm-gateway front` asks each gateway: the names it serves and its queue limit."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import os
import re
import reprlib
from typing import Any, TypeGuard
from urllib.parse import urlsplit

import aiohttp

from gateway.front.haproxy import MAX_MAXCONN
from gateway.front.topology import Gateway, Served

# Seconds for all that is asked of one gateway: a deadline, not a limit per read, which
# a gateway answering a byte at a time would never reach.
FETCH_TIMEOUT = 5.0


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


def read_all(
    urls: list[str], key: str | None, maxconn: int | None
) -> tuple[list[Gateway], list[FetchFailed]]:
    """Every gateway at once (a host that is down costs the deadline once, not in turn):
    those that told what they serve, and why the others did not."""
    results = asyncio.run(_read_all(urls, key, maxconn))
    return [r for r in results if isinstance(r, Gateway)], [r for r in results if isinstance(r, FetchFailed)]


async def _read_all(urls: list[str], key: str | None, maxconn: int | None) -> list[Gateway | FetchFailed]:
    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*(_read_in_time(session, url, key, maxconn) for url in urls))


async def _read_in_time(
    session: aiohttp.ClientSession, url: str, key: str | None, maxconn: int | None
) -> Gateway | FetchFailed:
    try:
        async with asyncio.timeout(FETCH_TIMEOUT):
            return await _read_gateway(session, url, key, maxconn)
    except TimeoutError:
        return FetchFailed(url, f"no complete answer within {FETCH_TIMEOUT:g} s")
    except FetchFailed as exc:
        return exc


async def _read_gateway(
    session: aiohttp.ClientSession, url: str, key: str | None, maxconn: int | None
) -> Gateway:
    """The gateway at `url` as its /v1/models and /gateway/models describe it; `maxconn`
    instead of its queue_limit (then /gateway/models may refuse, e.g. without the admin key)."""
    host, port = gateway_address(url)
    try:
        names = _served_names(await _get(session, url, "/v1/models", key))
    except ValueError as exc:
        raise FetchFailed(url, f"its /v1/models answer does not list models: {exc}") from None
    try:
        details = await _get(session, url, "/gateway/models", key)
    except FetchFailed:
        if maxconn is None:
            raise
        details = {}
    if maxconn is None:
        maxconn = details.get("queue_limit")
        if not _whole_number(maxconn, MAX_MAXCONN):
            raise FetchFailed(
                url, f"/gateway/models tells no queue_limit from 1 to {MAX_MAXCONN} (give --maxconn)"
            )
    delay = details.get("shutdown_delay")
    return Gateway(url, host, port, names, maxconn, delay if _seconds(delay) else None)


def _served_names(listing: dict[str, Any]) -> tuple[Served, ...]:
    """The names a /v1/models answer lists; ValueError saying what is wrong with it."""
    data = listing.get("data")
    if not isinstance(data, list):
        raise ValueError("no list in 'data'")
    return tuple(_served(entry) for entry in data)


def _served(entry: Any) -> Served:
    meta = entry.get("meta") if isinstance(entry, dict) else None
    alias_of = meta.get("alias_of") if isinstance(meta, dict) else None
    if (
        not isinstance(entry, dict)
        or not _name(entry.get("id"))
        or not isinstance(meta, dict | None)
        or not (alias_of is None or _name(alias_of))
    ):
        raise ValueError(f"not an entry with a name and what it is an alias of: {reprlib.repr(entry)}")
    return Served(entry["id"], alias_of or entry["id"], entry)


def _name(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _whole_number(value: Any, largest: int) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= largest


def _seconds(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < math.inf


async def _get(session: aiohttp.ClientSession, url: str, path: str, key: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        async with session.get(url + path, headers=headers, allow_redirects=False) as response:
            raw = await response.read()
    except aiohttp.ClientError as exc:  # refused, reset, not HTTP
        raise FetchFailed(url, f"GET {path} failed: {_reason(exc)}") from None
    if response.status != 200:
        hint = _key_hint(path, key is not None) if response.status == 401 else ""
        raise FetchFailed(url, f"GET {path} answered {response.status} {response.reason}{hint}")
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # not JSON (nor UTF-8), or nested too deep
        raise FetchFailed(url, f"GET {path} did not answer JSON: {reprlib.repr(str(exc))}") from None
    if not isinstance(body, dict):
        raise FetchFailed(url, f"GET {path} did not answer a JSON object")
    return body


def _reason(exc: aiohttp.ClientError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):  # its own text repeats the address
        error = exc.os_error  # asyncio words a refusal "Connect call failed": the errno says it
        return os.strerror(error.errno) if error.errno and error.errno > 0 else str(error.strerror or error)
    return str(exc) or type(exc).__name__


def _refuse_constant(name: str) -> Any:
    """NaN and Infinity: Python reads them, but the model list HAProxy serves must be JSON."""
    raise ValueError(f"{name} is not JSON")


def _key_hint(path: str, key_given: bool) -> str:
    """What would get past a 401."""
    if not key_given:
        return " (give a key with --api-key-env)"
    if path == "/gateway/models":  # only this call needs more than an API key
        return " (it needs the admin key in --api-key-env, or give --maxconn)"
    return " (it refused the key from --api-key-env)"
