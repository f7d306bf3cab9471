"""The proxy streamer: one request to a granted engine, its answer back to the client.

Server-sent events pass through chunk by chunk as the engine writes them; the only
change made to an answer is the `model` name, when the client asked by another name.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from gateway.engine.client import EngineRequestError
from gateway.engine.manager import EngineInstance
from gateway.errors import EngineFailed, GatewayError
from gateway.server.sse import sse_data, sse_json

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Content-Length",
        "Host",
    )
)
# The gateway's own credentials stay with the gateway.
CREDENTIALS = frozenset({"authorization", "x-api-key"})
_SSE = "text/event-stream"


class NotSent(Exception):
    """The engine failed before any byte went to the client: the request may be retried.

    `prompt_tokens` is set when the engine refused the prompt as too long for its context.
    """

    def __init__(self, reason: str, prompt_tokens: int | None = None) -> None:
        super().__init__(reason)
        self.prompt_tokens = prompt_tokens


@dataclass(frozen=True)
class Renamer:
    """Rewrites the engine's model name to the one the client used."""

    served: re.Pattern[bytes]
    requested: bytes

    @classmethod
    def between(cls, served: str, requested: str) -> Renamer | None:
        if served == requested:
            return None
        # llama-server writes names in UTF-8 (`"model":"tïny"`); JSON also allows them
        # escaped (`"t\u00efny"`) and spaces around the colon.
        names = {json.dumps(served, ensure_ascii=False).encode(), json.dumps(served).encode()}
        either = b"|".join(re.escape(name) for name in names)
        field = b'"model":' + json.dumps(requested, ensure_ascii=False).encode()
        return cls(re.compile(rb'"model"\s*:\s*(?:' + either + b")"), field)

    def __call__(self, data: bytes) -> bytes:
        return self.served.sub(lambda _: self.requested, data)  # a function: no escapes in it


def upstream_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """End-to-end headers only: hop-by-hop ones and those `Connection` names are dropped."""
    listed = {t.strip().lower() for t in headers.get("Connection", "").split(",")}
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP and k.lower() not in listed}


def engine_request_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """What of the client's headers the engine sees. The body sent is the gateway's own
    JSON (aiohttp decoded any Content-Encoding, rules may have rewritten it), so the
    gateway describes it. Answers come uncompressed: the model name is renamed and
    context errors are read in them."""
    passed = {k: v for k, v in upstream_headers(headers).items() if _to_engine(k.lower())}
    return {**passed, "Accept-Encoding": "identity", "Content-Type": "application/json"}


def _to_engine(name: str) -> bool:
    return name not in CREDENTIALS and name != "accept-encoding" and not name.startswith("content-")


async def forward(
    request: web.Request,
    instance: EngineInstance,
    data: bytes,
    headers: Mapping[str, str],
    renamer: Renamer | None,
    started: web.StreamResponse | None,
    response_headers: Mapping[str, str],
) -> web.StreamResponse:
    """Send the request to the engine and relay its answer; raises NotSent when nothing
    reached the client and the engine failed or refused the prompt as too long.

    `started` is an SSE response already sent to the client (loading keep-alives).
    """
    upstream = await _open(instance, request.path, data, headers)
    instance.open_responses.add(upstream)
    try:
        first = await _first_chunk(upstream)
        if upstream.status == 400:
            first += await _rest(upstream)
            overflow = instance.engine.context_overflow(upstream.status, first)
            if overflow is not None:
                raise NotSent("the engine's context is too small", prompt_tokens=overflow)
        if _SSE in upstream.headers.get("Content-Type", "") or started is not None:
            return await _relay_stream(request, instance, upstream, first, renamer, started, response_headers)
        body = first + await _rest(upstream)
        return web.Response(
            status=upstream.status,
            body=renamer(body) if renamer else body,
            headers={**upstream_headers(upstream.headers), **response_headers},
        )
    finally:
        instance.open_responses.discard(upstream)
        upstream.close()  # also the way a cancelled request reaches the engine: it frees the slot


async def _open(
    instance: EngineInstance, path: str, data: bytes, headers: Mapping[str, str]
) -> aiohttp.ClientResponse:
    """Send the request; its answer's headers come back (for a non-streamed request,
    only once the whole answer is ready). A drain timeout cancels the wait."""
    # Not retried here: a POST the engine may have taken is retried, if at all, by the
    # handler once it knows whether the engine died.
    opening = asyncio.ensure_future(instance.client.open("POST", path, data, headers, idempotent=False))
    instance.open_requests.add(opening)
    try:
        return await opening
    except EngineRequestError as exc:
        raise NotSent(f"engine unreachable: {exc}") from None
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if instance.was_cut_off and not (current and current.cancelling()):
            raise NotSent("cut off by drain_timeout") from None
        raise
    finally:
        instance.open_requests.discard(opening)


async def _first_chunk(upstream: aiohttp.ClientResponse) -> bytes:
    try:
        return await upstream.content.readany()
    except (aiohttp.ClientError, ConnectionError) as exc:
        raise NotSent(f"engine failed before answering: {exc}") from None


async def _rest(upstream: aiohttp.ClientResponse) -> bytes:
    try:
        return await upstream.content.read()
    except (aiohttp.ClientError, ConnectionError) as exc:
        raise NotSent(f"engine failed while answering: {exc}") from None


async def _relay_stream(
    request: web.Request,
    instance: EngineInstance,
    upstream: aiohttp.ClientResponse,
    first: bytes,
    renamer: Renamer | None,
    started: web.StreamResponse | None,
    response_headers: Mapping[str, str],
) -> web.StreamResponse:
    if started is not None:
        response = started
        if _SSE not in upstream.headers.get("Content-Type", ""):
            # The client already has a 200 event stream: an error answer becomes an event.
            body = first + await _rest(upstream)
            await response.write(sse_data(renamer(body) if renamer else body))
            return response
    else:
        response = web.StreamResponse(
            status=upstream.status,
            headers={**upstream_headers(upstream.headers), **response_headers},
        )
        await response.prepare(request)
    try:
        broken = await _pump(upstream, response, first, renamer)
        if instance.was_cut_off:
            await write_error_event(response, EngineFailed("cut off: drain_timeout passed in a swap"))
        elif broken:
            await write_error_event(response, EngineFailed(f"the engine failed mid-stream: {broken}"))
    except ConnectionResetError:
        request["client_gone"] = True  # leaving closes the engine's connection too
    return response


async def _pump(
    upstream: aiohttp.ClientResponse,
    response: web.StreamResponse,
    chunk: bytes,
    renamer: Renamer | None,
) -> str | None:
    """Copy the engine's stream to the client as it comes; why it broke off, if it did."""
    carry = b""
    while chunk:
        if renamer is None:
            await response.write(chunk)
        else:
            # Rename whole lines only: a name split across two chunks must not slip by.
            carry += chunk
            cut = carry.rfind(b"\n") + 1
            if cut:
                await response.write(renamer(carry[:cut]))
                carry = carry[cut:]
        try:
            chunk = await upstream.content.readany()
        except (aiohttp.ClientError, ConnectionError) as exc:
            return str(exc) or type(exc).__name__
    if carry:
        await response.write(renamer(carry) if renamer else carry)
    return None


async def write_error_event(response: web.StreamResponse, error: GatewayError) -> None:
    """An error after the stream's headers went out: as an SSE event, as OpenAI does."""
    await response.write(sse_json(error.body()))
