"""The proxy streamer: one request to a granted engine, its answer back to the client.

Server-sent events pass through chunk by chunk as the engine writes them; the only
change made to an answer is the `model` name, when the client asked by another name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import HttpVersion11, web

from gateway.engine.manager import EngineInstance
from gateway.engine.stream import EngineStream, Head, StreamBroken, open_stream, send
from gateway.errors import EngineFailed, EngineRejected, GatewayError
from gateway.server.keys import CLIENT_LEFT, FIRST_TOKEN_AT, RECORD
from gateway.server.sse import sse_data, sse_json

log = logging.getLogger("gateway.proxy")

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
# Bytes waiting in the client's socket buffer beyond which the engine is no longer read
# until the client catches up (aiohttp's own writer waits at 64 KiB).
HIGH_WATER = 64 * 1024
# llama-server's words when its KV cache had no room left for a batch: it fails every
# request then being processed, and clears their cells. "Invalid input batch" comes
# when the cells an idle slot kept were not cleared in time for a request's sequences.
ENGINE_FULL = ("Context size has been exceeded", "Invalid input batch")


class NotSent(Exception):
    """The engine failed before any byte went to the client: the request may be retried.

    `prompt_tokens` is set when the engine refused the prompt as too long for its context;
    `engine_full` when the engine's KV cache ran out while it processed the request;
    `delivered` unless the request never reached the engine (no connection).
    """

    def __init__(
        self, reason: str, prompt_tokens: int | None = None, engine_full: bool = False, delivered: bool = True
    ) -> None:
        super().__init__(reason)
        self.prompt_tokens = prompt_tokens
        self.engine_full = engine_full
        self.delivered = delivered


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
    reached the client and the engine failed, refused the prompt as too long, or ran
    out of KV cache.

    `started` is an SSE response already sent to the client (loading keep-alives).
    """
    stream = await _open(instance, request.path, data, headers)
    instance.open_responses.add(stream)
    try:
        head = await _head(instance, stream)
        streamed = _SSE in head.headers.get("Content-Type", "")
        # A stream's first event, or a whole answer: enough to know whether to retry.
        first = await (_first_event(stream) if streamed else _whole(stream))
        _raise_if_retryable(instance, head.status, first, streamed)
        if streamed:
            return await _relay_stream(
                request, instance, stream, head, first, renamer, started, response_headers
            )
        return await _relay_whole(request, head, first, renamer, started, response_headers)
    finally:
        instance.open_responses.discard(stream)
        stream.close()  # also the way a cancelled request reaches the engine: it frees the slot


async def _open(instance: EngineInstance, path: str, data: bytes, headers: Mapping[str, str]) -> EngineStream:
    """Send the request on the engine's spare connection, or connect (a connection of its
    own) and send it. A drain timeout cancels the wait for a connection."""
    # Not retried here: a POST the engine may have taken is retried, if at all, by the
    # handler once it knows whether the engine died.
    client = instance.client
    headers = {**headers, **client.headers}
    spare = instance.spare.take() if instance.spare is not None else None
    try:
        if spare is not None:
            send(spare, client.base_url, path, data, headers)  # at once: no connect to wait for
            return spare
        opening = asyncio.ensure_future(open_stream(client.base_url, path, data, headers))
        instance.open_requests.add(opening)
        try:
            return await opening
        finally:
            instance.open_requests.discard(opening)
    except (OSError, TimeoutError, ValueError) as exc:
        raise NotSent(f"engine unreachable: {type(exc).__name__}: {exc}", delivered=False) from None
    except asyncio.CancelledError:
        _raise_if_cut_off(instance)
        raise


async def _head(instance: EngineInstance, stream: EngineStream) -> Head:
    """The answer's status and headers (for a non-streamed request, llama-server sends
    them with the whole answer)."""
    try:
        return await stream.head
    except StreamBroken as exc:
        _raise_if_cut_off(instance)
        raise NotSent(f"engine failed before answering: {exc}") from None


def _raise_if_cut_off(instance: EngineInstance) -> None:
    current = asyncio.current_task()
    if instance.cut_off_reason and not (current and current.cancelling()):
        raise NotSent(f"cut off: {instance.cut_off_reason}") from None


async def _read(stream: EngineStream) -> bytes:
    """Read from the engine before anything went to the client."""
    try:
        return await stream.read()
    except StreamBroken as exc:
        raise NotSent(f"engine failed before answering: {exc}") from None


async def _whole(stream: EngineStream) -> bytes:
    parts = []
    while part := await _read(stream):
        parts.append(part)
    return b"".join(parts)


async def _first_event(stream: EngineStream) -> bytes:
    """The stream's start, read on until its first event that is not an opening one is
    whole (or the stream ends)."""
    chunk = await _read(stream)
    while _first_real_event(chunk) is None:
        more = await _read(stream)
        if not more:
            break
        chunk += more
    return chunk


_EVENT_END = re.compile(rb"\r?\n\r?\n")
# A chat stream's first event per answer: the role and no text. llama-server sends them
# before it processes the prompt, so a failure of its KV cache can still follow them.
_OPENING = (b'"delta":{"role":"assistant","content":null}', b'"finish_reason":null')


def _first_real_event(start: bytes) -> bytes | None:
    """The first whole event of a stream's start that is not an opening one, if any."""
    *whole, _rest = _EVENT_END.split(start)
    return next((event for event in whole if not all(mark in event for mark in _OPENING)), None)


def _raise_if_retryable(instance: EngineInstance, status: int, first: bytes, streamed: bool) -> None:
    """NotSent for the refusals that another try (maybe on a larger variant) can serve."""
    overflow = instance.engine.context_overflow(status, first)
    if overflow is not None:
        raise NotSent("the engine's context is too small", prompt_tokens=overflow)
    if not any(words.encode() in first for words in ENGINE_FULL):  # found without parsing
        return
    message = _stream_error(first) if streamed else _body_error(first)
    if message is not None and any(words in message for words in ENGINE_FULL):
        raise NotSent(f"the engine's KV cache ran out before it answered ({message!r})", engine_full=True)


def _stream_error(first: bytes) -> str | None:
    """The message of a stream's first event if it is an error: llama-server writes
    `data: {"error": {...}}`, or in Anthropic's format `event: error` and the error bare."""
    lines = (_first_real_event(first) or b"").splitlines()
    value = _json_object(b"\n".join(line[5:] for line in lines if line.startswith(b"data:")))
    if value is None:
        return None
    return _message(value if b"event: error" in lines else value.get("error"))


def _body_error(body: bytes) -> str | None:
    """The message of an error answer in OpenAI's shape, `{"error": {"message": ...}}`."""
    value = _json_object(body)
    return _message(value.get("error")) if value is not None else None


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _message(error: Any) -> str | None:
    message = error.get("message") if isinstance(error, dict) else None
    return message if isinstance(message, str) else None


def _readable_error(status: int, reason: str, body: bytes) -> bytes | None:
    """An engine error with an empty or unreadable body, in OpenAI's shape (the status
    stays the engine's); None when the client can read it as it is."""
    if _body_error(body) is not None:
        return None
    said = body.decode("utf-8", "replace").strip()[:300]
    message = f"the engine answered HTTP {status} {reason}" + (f": {said}" if said else " with an empty body")
    return json.dumps(EngineRejected(status, message).body()).encode()


async def _relay_whole(
    request: web.Request,
    head: Head,
    body: bytes,
    renamer: Renamer | None,
    started: web.StreamResponse | None,
    response_headers: Mapping[str, str],
) -> web.StreamResponse:
    headers = {**upstream_headers(head.headers), **response_headers}
    if head.status >= 400 and (readable := _readable_error(head.status, head.reason, body)):
        body = readable
        headers["Content-Type"] = "application/json"
    if head.status < 400 and (record := request.get(RECORD)) is not None:
        record.read_usage(body)
    body = renamer(body) if renamer else body
    if started is not None:
        # The client already has a 200 event stream: the answer becomes an event.
        await started.write(sse_data(body))
        return started
    return web.Response(status=head.status, body=body, headers=headers)


async def _relay_stream(
    request: web.Request,
    instance: EngineInstance,
    stream: EngineStream,
    head: Head,
    first: bytes,
    renamer: Renamer | None,
    started: web.StreamResponse | None,
    response_headers: Mapping[str, str],
) -> web.StreamResponse:
    response = started
    if response is None:  # (not `started or ...`: a response is a mapping too)
        headers = {**upstream_headers(head.headers), **response_headers}
        response = web.StreamResponse(status=head.status, headers=headers)
    try:
        if started is None:
            await response.prepare(request)  # (a client that left just now: ConnectionResetError)
        request[FIRST_TOKEN_AT] = time.monotonic()
        pipe = ClientPipe(request, response, stream, renamer)
        broken = await pipe.run(first)
        if (record := request.get(RECORD)) is not None and pipe.last:
            record.read_usage(pipe.last)
        if pipe.client_gone:
            request[CLIENT_LEFT] = True
        elif pipe.framing_lost:
            log.warning("%s: the engine broke off deep inside a chunk (%s): client cut", request.path, broken)
        elif instance.cut_off_reason:
            await write_error_event(response, EngineFailed(f"cut off: {instance.cut_off_reason}"))
        elif broken:
            await write_error_event(response, EngineFailed(f"the engine failed mid-stream: {broken}"))
    except ConnectionResetError:
        request[CLIENT_LEFT] = True  # leaving closes the engine's connection too
    return response


class ClientPipe:
    """The client's side of a relayed stream: what each read of the engine brings is
    written to the client's transport as it arrives. Most streams pass the engine's
    chunks on as they are (framing and all, nothing copied); a renamed one, or one to an
    HTTP/1.0 client, is unframed, renamed, and framed again if the client takes chunks.
    When the client reads slower than the engine writes, the engine is no longer read
    (its connection's flow control holds it back) until the client has caught up: memory
    stays bounded whatever the client does."""

    def __init__(
        self,
        request: web.Request,
        response: web.StreamResponse,
        stream: EngineStream,
        renamer: Renamer | None,
    ) -> None:
        assert request.transport is not None
        self._transport = request.transport
        self._writer = request.writer  # its drain() waits for the client to catch up
        self._response = response
        self._stream = stream
        self._renamer = renamer
        self._carry = b""  # a renamed stream's last line, until it is whole
        self._backlog: list[bytes] | None = None  # bytes held while the client catches up
        self._backlogged: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # HTTP/1.0 has no chunked encoding: its answer is the bytes up to the close.
        self._chunked = request.version >= HttpVersion11
        self._previous = b""  # the read before the last one (an event may span both)
        self.last = b""  # the last read(s) that reported what was generated (usage, timings)
        self.client_gone = False
        self.framing_lost = False  # the engine broke off deep inside a chunk: the client was cut

    async def run(self, first: bytes) -> str | None:
        """Relay the rest of the stream after its `first` bytes; why it broke off, if it did."""
        if b'"timings"' in first or b'"usage"' in first:  # a short answer may be all in it
            self.last = first
        await self._response.write(self._renamed(first))  # also sends the headers
        as_framed = self._renamer is None and self._chunked
        if not (as_framed and self._stream.relay_chunks(self.deliver_chunks)):
            self._stream.relay_to(self.deliver)
        while not self._stream.ended.done():
            waits: list[asyncio.Future[Any]] = [self._stream.ended, self._backlogged]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            await self._catch_up()
        # What completes a chunk the engine broke off inside: the error event that follows
        # must be a chunk of its own. It may be held too, so the last catch-up comes after.
        rest = self._stream.chunk_end() if self._stream.ended.result() is not None else b""
        if rest is None:  # too much of a chunk is missing to pad: the client's framing is lost
            self.framing_lost = True
            self._transport.abort()
        else:
            if rest:
                self._send(rest)
            await self._catch_up()
        if self._carry:
            await self._response.write(self._renamer(self._carry) if self._renamer else self._carry)
        return None if self.client_gone else self._stream.ended.result()

    def deliver_chunks(self, data: bytes) -> None:
        """Bytes of the engine's chunks, framing and all (called by its connection)."""
        if b'"timings"' in data or b'"usage"' in data:
            self.last = self._previous + data
        self._previous = data
        self._send(data)

    def deliver(self, payloads: list[bytes]) -> None:
        """The payloads of one read of the engine (called by its connection): one chunk."""
        for piece in reversed(payloads):
            if b'"timings"' in piece or b'"usage"' in piece:
                self.last = piece
                break
        out = self._renamed(payloads[0] if len(payloads) == 1 else b"".join(payloads))
        if out:
            self._send(b"%x\r\n%b\r\n" % (len(out), out) if self._chunked else out)

    def _send(self, out: bytes) -> None:
        """Write to the client now, or hold it (and stop reading the engine) while the
        client's buffer is full."""
        if self.client_gone:
            return
        if self._backlog is not None:
            self._backlog.append(out)
        elif self._transport.is_closing():
            self.client_gone = True
            self._stream.close()
        elif self._transport.get_write_buffer_size() > HIGH_WATER:
            self._stream.pause()
            self._backlog = [out]
            if not self._backlogged.done():
                self._backlogged.set_result(None)
        else:
            self._transport.write(out)

    async def _catch_up(self) -> None:
        """Write what was held back at the client's pace, then read the engine again."""
        if self._backlog is None:
            return
        while self._backlog:
            held, self._backlog = self._backlog, []
            for out in held:
                if self._transport.is_closing():
                    raise ConnectionResetError("the client left")
                self._transport.write(out)
                await self._writer.drain()
        self._backlog = None
        self._backlogged = asyncio.get_running_loop().create_future()
        self._stream.resume()

    def _renamed(self, payload: bytes) -> bytes:
        """Rename whole lines only: a name split across two payloads must not slip by."""
        if self._renamer is None:
            return payload
        self._carry += payload
        cut = self._carry.rfind(b"\n") + 1
        if not cut:
            return b""
        whole, self._carry = self._carry[:cut], self._carry[cut:]
        return self._renamer(whole)


async def write_error_event(response: web.StreamResponse, error: GatewayError) -> None:
    """An error after the stream's headers went out: as an SSE event, as OpenAI does."""
    await response.write(sse_json(error.body()))
