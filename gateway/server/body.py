"""Request bodies read as strictly as the engine reads them: Content-Encoding undone by
the gateway itself, then strict JSON in UTF-8."""

from __future__ import annotations

import json
import math
import re
import zlib
from typing import Any, NoReturn

from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError

from gateway.errors import InvalidRequest, UnsupportedEncoding


async def read_json_object(request: web.Request) -> tuple[dict[str, Any], bytes]:
    """The body as JSON, held to what the engine reads too: strict JSON in UTF-8 (a
    byte order mark is allowed).

    Python's json also takes NaN and Infinity, numbers beyond a double (1e400 becomes
    inf), UTF-16 and UTF-32, and lone surrogates (`"\\ud800"`); the engine refuses them,
    so the gateway does it first, in its own words.
    """
    try:
        raw = _decoded(request, await request.read())  # over client_max_size: aiohttp raises 413
    except ContentEncodingError as exc:  # aiohttp decoding itself (auto_decompress on)
        raise InvalidRequest(f"the request body does not match its Content-Encoding: {exc.message}") from None
    try:
        body = json.loads(raw.decode("utf-8-sig"), parse_constant=_no_constant, parse_float=_finite)
        # In the try: near the recursion limit the check may run out of stack where
        # the parser did not.
        lone = _SURROGATE_ESCAPE.search(raw) is not None and _has_lone_surrogate(body)
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not valid UTF-8") from None
    except RecursionError:
        raise InvalidRequest("the request body is nested too deeply") from None
    except ValueError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    if raw.count(b'"model"') > 1 and _names_model_twice(raw):
        raise InvalidRequest(
            "the request body names 'model' more than once (a load balancer in front may read "
            "the first, the gateway reads the last)",
            param="model",
        )
    if lone:
        raise InvalidRequest("the request body is not valid Unicode: it escapes a lone surrogate")
    return body, raw


def _names_model_twice(raw: bytes) -> bool:
    """Whether the top-level object has two `model` keys (parsed again only when the bytes
    say it may: nested objects may have a "model" key of their own)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        return {"model twice": [key for key, _ in items].count("model") > 1}

    return bool(json.loads(raw.decode("utf-8-sig"), object_pairs_hook=pairs)["model twice"])


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # cheap; only then is the body checked
_ZLIB_WBITS = {"gzip": 31, "x-gzip": 31, "deflate": 15}


def _decoded(request: web.Request, raw: bytes) -> bytes:
    """The body with its Content-Encoding undone. The server leaves that to the gateway
    (auto_decompress=False), so a body its encoding does not describe and an encoding it
    cannot undo are answered in OpenAI's shape; the decoded size is held to client_max_size."""
    header = request.headers.get("Content-Encoding", "")
    for coding in reversed([c.strip().lower() for c in header.split(",") if c.strip()]):
        if coding == "identity":
            continue
        if coding not in _ZLIB_WBITS:
            raise UnsupportedEncoding(
                f"the request body's Content-Encoding {coding!r} is not supported: send it as "
                "gzip, deflate or identity",
                headers={"Accept-Encoding": "gzip, deflate"},
            )
        raw = _inflate(coding, raw, request.client_max_size)
    return raw


def _inflate(coding: str, data: bytes, limit: int) -> bytes:
    wbits = _ZLIB_WBITS[coding]
    if coding == "deflate" and data[:1] and data[0] & 0x0F != 8:
        wbits = -15  # raw deflate without the zlib header, as some clients send it
    out = bytearray()
    try:
        while True:  # gzip allows several members one after another
            inflater = zlib.decompressobj(wbits)
            out += inflater.decompress(data, limit + 1 - len(out) if limit else 0)
            if limit and (len(out) > limit or inflater.unconsumed_tail):
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(out))
            if not inflater.eof:
                raise zlib.error("the data ends early")
            data = inflater.unused_data
            if not data:
                return bytes(out)
    except zlib.error as exc:
        raise InvalidRequest(
            f"the request body is not valid {coding} data (its Content-Encoding): {exc}"
        ) from None


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _has_lone_surrogate(body: Any) -> bool:
    """Whether a string holds half a surrogate pair (a whole pair is decoded to one character)."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
