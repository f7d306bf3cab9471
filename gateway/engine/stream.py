"""EngineStream: one request to an engine on a connection of its own, its answer read at
the protocol level.

aiohttp's client would parse every chunk of a streamed answer into a stream reader and
wake a coroutine to copy it to the client: most of the gateway's CPU per chunk. Here the
connection is an asyncio Protocol: `data_received` undoes the engine's chunked framing
and hands the payloads of each read straight to a sink (the client's side,
gateway/server/proxy.py), all at once: one write to the client per read of the engine.
Until a sink is set, payloads are kept, so that the start of an answer can be read
first (to retry a refused request before anything reached the client).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import select
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast

from multidict import CIMultiDict
from yarl import URL

CONNECT_TIMEOUT = 5.0  # seconds, as the engine client's sock_connect
# Seconds a spare connection is used for at most: llama-server closes a connection on
# which no request came for 5 s.
SPARE_MAX_AGE = 4.0
MAX_HEAD = 64 * 1024  # bytes of status line and headers an engine may send
MAX_PADDING = 64 * 1024  # bytes of a broken-off chunk the gateway pads; beyond, it cuts
Sink = Callable[[list[bytes]], None]  # the payloads of one read, in order


class StreamBroken(ConnectionError):
    """The engine's connection failed or closed before its answer ended."""


class FramingBroken(ValueError):
    """A chunk size line that is none, after `passed`: the bytes before it to pass on."""

    def __init__(self, why: str, passed: bytes) -> None:
        super().__init__(why)
        self.passed = passed


@dataclass(frozen=True)
class Head:
    status: int
    reason: str
    headers: CIMultiDict[str]


class ChunkedBody:
    """Undoes `Transfer-Encoding: chunked`, across reads split anywhere."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data = 0  # payload bytes of the current chunk still to come
        self._crlf = 0  # bytes of the CRLF after a chunk's payload still to skip
        self._trailers = False  # the last chunk came: skip trailers up to the blank line
        self._skip = 0  # (passing through) bytes of the current chunk still to come
        self.done = False

    def feed(self, data: bytes) -> list[bytes]:
        """The payloads `data` completes or continues (one slice of it per chunk it holds)."""
        buffer = self._buffer + data if self._buffer else data
        out: list[bytes] = []
        at, end = 0, len(buffer)
        while at < end and not self.done:
            if self._data:  # inside a chunk's payload
                piece = buffer[at : at + self._data]
                at += len(piece)
                self._data -= len(piece)
                self._crlf = 0 if self._data else 2
                out.append(piece)
            elif self._crlf:  # the CRLF after a payload
                skipped = min(self._crlf, end - at)
                at, self._crlf = at + skipped, self._crlf - skipped
            else:  # a size line, or a trailer line after the last chunk
                eol = buffer.find(b"\r\n", at)
                if eol < 0:
                    break
                line, at = buffer[at:eol], eol + 2
                if self._trailers:
                    self.done = not line
                    continue
                size = _chunk_size(line)
                if size and at + size + 2 <= end:  # the usual case: the whole chunk is here
                    out.append(buffer[at : at + size])
                    at += size + 2
                else:
                    self._data, self._trailers = size, size == 0
        self._buffer = b"" if self.done else buffer[at:]
        return out

    def at_chunk_start(self) -> bool:
        """Whether what was fed so far ends where a chunk starts (or in its size line)."""
        return not (self._data or self._crlf or self._trailers or self.done)

    def pass_through(self, data: bytes) -> bytes:
        """The bytes of `data` to pass on as they are, framing and all: up to the last
        chunk (not that, nor trailers), less a size line not yet whole (held for the
        next read). Framing is followed by the sizes alone, payloads are not copied."""
        if self.done:
            return b""
        buffer = self._buffer + data if self._buffer else data
        at, end = self._skip, len(buffer)
        self._buffer, self._skip = b"", 0
        while at < end:
            eol = buffer.find(b"\r\n", at)
            if eol < 0:
                self._buffer = buffer[at:]
                return buffer[:at]
            try:
                size = _chunk_size(buffer[at:eol])
            except ValueError as exc:
                raise FramingBroken(str(exc), buffer[:at]) from None
            if not size:
                self.done = True
                return buffer[:at]
            at = eol + size + 4  # its size line's CRLF, its payload and the CRLF after it
        self._skip = at - end
        return buffer

    def chunk_end(self) -> bytes | None:
        """What completes a chunk passed on in part (the engine broke off inside it):
        blank lines for the payload still missing, and the CRLF after it, so that the
        client's framing holds for what comes next; None when more is missing than is
        worth padding (the client's connection must be cut instead)."""
        if self._skip > MAX_PADDING:
            return None
        return b"\n" * (self._skip - 2) + b"\r\n"[-self._skip :] if self._skip else b""

    def ended_at_close(self) -> bool:
        return self.done


def _chunk_size(line: bytes) -> int:
    """A chunk's size from its size line (raises ValueError if it is none)."""
    size = line.split(b";", 1)[0].strip() if b";" in line or b" " in line or b"\t" in line else line
    if not size or size.strip(b"0123456789abcdefABCDEF"):  # (int() would also take "0x1f", "1_f")
        raise ValueError(f"not a chunk size: {line[:20]!r}")
    return int(size, 16)


class LengthBody:
    """A body of `Content-Length` bytes, or (`None`) one that ends when the connection does."""

    def __init__(self, length: int | None) -> None:
        self._left = length
        self.done = length == 0

    def feed(self, data: bytes) -> list[bytes]:
        if self._left is None:
            return [data]
        piece = data[: self._left]
        self._left -= len(piece)
        self.done = self._left == 0
        return [piece] if piece else []

    def ended_at_close(self) -> bool:
        return self.done or self._left is None


class EngineStream(asyncio.Protocol):
    """A request sent on a connection of its own, its answer's head, then its payloads."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.head: asyncio.Future[Head] = loop.create_future()
        # A request cancelled before its head came never awaits it: its failure is no news.
        self.head.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.ended: asyncio.Future[str | None] = loop.create_future()  # None: whole; else why not
        self.transport: asyncio.Transport | None = None
        self._raw = b""  # the head, until it is whole
        self._body: ChunkedBody | LengthBody | None = None
        self._sink: Sink | None = None
        self._chunks: ChunkedBody | None = None  # passing the engine's chunks on as they are
        self._chunk_sink: Callable[[bytes], None] | None = None
        self._kept: list[bytes] = []  # payloads before a sink is set
        self._arrived: asyncio.Future[None] = loop.create_future()  # a reader waits on it
        self._clock = loop.time
        self.last_read = 0.0  # loop time of its last bytes from the engine
        # Loop time of its last pause or resume (a slow client): what it reads around then
        # may have waited in the kernel, no sign that the engine is alive now.
        self.last_paused = 0.0

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is no subclass of it)

    def data_received(self, data: bytes) -> None:
        self.last_read = self._clock()
        if self._chunks is not None:
            self._pass_on(self._chunks, data)
            return
        if self._body is None:
            data = self._read_head(data)
            if self._body is None:
                return
        try:
            payloads = self._body.feed(data)
        except ValueError:
            self._fail("a chunked body that does not parse")
            return
        if payloads:
            if self._sink is not None:
                self._sink(payloads)
            else:
                self._kept.extend(payloads)
                self._wake()
        if self._body.done:
            self._end(None)

    def connection_lost(self, exc: Exception | None) -> None:
        why = f"{type(exc).__name__}: {exc}" if exc else "the engine closed the connection"
        if not self.head.done():
            self.head.set_exception(StreamBroken(f"before its answer: {why}"))
        self._end(None if self._body is not None and self._body.ended_at_close() else why)

    # --- reading -------------------------------------------------------------------------------

    async def read(self) -> bytes:
        """The payloads that came since the last read (waits for one; b"" at the end)."""
        while not self._kept and not self.ended.done():
            self._arrived = asyncio.get_running_loop().create_future()
            await self._arrived
        if not self._kept and self.ended.result() is not None:
            raise StreamBroken(self.ended.result())
        kept, self._kept = self._kept, []
        return b"".join(kept)

    def relay_to(self, sink: Sink) -> None:
        """From now on the payloads of every read go to `sink` as they arrive."""
        assert not self._kept, "read what came first"
        self._sink = sink

    def relay_chunks(self, sink: Callable[[bytes], None]) -> bool:
        """From now on the bytes of every read go to `sink` as the engine framed them,
        less its last chunk; False (nothing changes) unless the body is chunked and all
        fed so far ends where a chunk starts."""
        assert not self._kept, "read what came first"
        body = self._body
        if not isinstance(body, ChunkedBody) or not body.at_chunk_start():
            return False
        self._chunks, self._chunk_sink = body, sink
        return True

    def chunk_end(self) -> bytes | None:
        """What completes the chunk passed on last, if the engine broke off inside it
        (see ChunkedBody.chunk_end)."""
        return self._chunks.chunk_end() if self._chunks is not None else b""

    def pause(self) -> None:
        self.last_paused = self._clock()
        if self.transport is not None:
            self.transport.pause_reading()

    def resume(self) -> None:
        self.last_paused = self._clock()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        """Close the connection: the engine stops working on the request."""
        if self.transport is not None:
            self.transport.close()
        self._end("closed by the gateway")

    # --- internals ------------------------------------------------------------------------------

    def _read_head(self, data: bytes) -> bytes:
        self._raw += data
        end = self._raw.find(b"\r\n\r\n")
        if end < 0:
            if len(self._raw) > MAX_HEAD:
                self._fail(f"an answer head over {MAX_HEAD} bytes")
            return b""
        try:
            head = _parse_head(self._raw[:end])
        except ValueError as exc:
            self._fail(f"an answer head that is not HTTP: {exc}")
            return b""
        rest, self._raw = self._raw[end + 4 :], b""
        chunked = "chunked" in head.headers.get("Transfer-Encoding", "").lower()
        length = head.headers.get("Content-Length")
        self._body = ChunkedBody() if chunked else LengthBody(int(length) if length else None)
        self.head.set_result(head)
        return rest

    def _pass_on(self, chunks: ChunkedBody, data: bytes) -> None:
        try:
            passed = chunks.pass_through(data)
        except FramingBroken as exc:
            if exc.passed and self._chunk_sink is not None:
                self._chunk_sink(exc.passed)  # it completes the chunk before
            self._fail("a chunked body that does not parse")
            return
        if passed and self._chunk_sink is not None:
            self._chunk_sink(passed)
        if chunks.done:
            self._end(None)

    def _fail(self, why: str) -> None:
        if not self.head.done():
            self.head.set_exception(StreamBroken(why))
        self._end(why)
        if self.transport is not None:
            self.transport.close()

    def _end(self, why: str | None) -> None:
        if not self.ended.done():
            self.ended.set_result(why)
        self._wake()

    def _wake(self) -> None:
        if not self._arrived.done():
            self._arrived.set_result(None)


def _parse_head(raw: bytes) -> Head:
    status_line, *lines = raw.decode("latin-1").split("\r\n")
    version, code, *reason = status_line.split(" ", 2)
    if not version.startswith("HTTP/1."):
        raise ValueError(status_line[:80])
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(line[:80])
        headers.add(name.strip(), value.strip())
    return Head(int(code), reason[0] if reason else "", headers)


async def open_stream(base_url: str, path: str, data: bytes, headers: Mapping[str, str]) -> EngineStream:
    """Send the request on a new connection (raises OSError or TimeoutError when the
    connection cannot be made)."""
    stream = await _connected(URL(base_url))
    send(stream, base_url, path, data, headers)
    return stream


def send(stream: EngineStream, base_url: str, path: str, data: bytes, headers: Mapping[str, str]) -> None:
    """Write the request on the stream's connection (ValueError for a header that would
    split: the stream is closed then)."""
    url = URL(base_url)
    target = url.path.rstrip("/") + path
    lines = [
        f"POST {target} HTTP/1.1",
        f"Host: {url.raw_authority}",
        f"Content-Length: {len(data)}",
        "Connection: close",  # one request per connection: its end is the answer's end
        *(f"{name}: {value}" for name, value in headers.items() if name.lower() not in _SET_HERE),
    ]
    if any("\r" in line or "\n" in line for line in lines):
        stream.close()
        raise ValueError("a header with a line break")  # the engine must never see a split header
    assert stream.transport is not None
    # aiohttp reads header bytes as UTF-8 with surrogate escapes: this writes them back as they came.
    stream.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + data)


async def _connected(url: URL) -> EngineStream:
    """A new connection to the engine at `url`, its stream waiting for a request."""
    host, port = url.host or "127.0.0.1", url.port or (443 if url.scheme == "https" else 80)
    context = ssl.create_default_context() if url.scheme == "https" else None
    stream = EngineStream()
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(CONNECT_TIMEOUT):
        if _is_ip(host) and context is None:
            # An address needs no lookup (uvloop would still ask a resolver thread: ~2 ms).
            await loop.create_connection(lambda: stream, sock=await _connect(host, port))
        else:
            await loop.create_connection(lambda: stream, host, port, ssl=context)
    return stream


async def _connect(host: str, port: int) -> socket.socket:
    """A connected non-blocking socket to an address (no name lookup)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class SpareConnection:
    """One connection to a local engine, opened ahead of the request that will use it, so
    that the request is written at once instead of after a connect. A connection serves
    one request (llama-server closes it after a stream): taking the spare opens the next."""

    def __init__(self, url: URL) -> None:
        self._url = url
        self._ready: tuple[EngineStream, float] | None = None  # the stream, and when it connected
        self._opening: asyncio.Task[None] | None = None
        self._closed = False

    def take(self) -> EngineStream | None:
        """The spare, if one is ready, young, and neither closed nor written on by the
        engine (the next one is opened now)."""
        ready, self._ready = self._ready, None
        self.open_next()
        if ready is None:
            return None
        stream, connected = ready
        if time.monotonic() - connected < SPARE_MAX_AGE and _silent(stream):
            return stream
        stream.close()
        return None

    def close(self) -> None:
        """For good: the engine stops."""
        self._closed = True
        if self._opening is not None:
            self._opening.cancel()
        if self._ready is not None:
            self._ready[0].close()
            self._ready = None

    def open_next(self) -> None:
        """Open the spare, unless one is open or opening."""
        if not self._closed and self._opening is None and self._ready is None:
            self._opening = asyncio.ensure_future(self._open())

    async def _open(self) -> None:
        try:
            stream = await _connected(self._url)
        except (OSError, TimeoutError):
            return  # no spare: the next request connects itself (and asks for one again)
        finally:
            self._opening = None
        if self._closed:
            stream.close()
        else:
            self._ready = (stream, time.monotonic())


def _silent(stream: EngineStream) -> bool:
    """Whether the engine has neither closed the connection nor written on it, as far as
    the kernel knows (the loop may not have read it yet)."""
    if stream.ended.done() or stream.last_read or stream.transport is None:
        return False
    poller = select.poll()  # (select.select stops at descriptor 1024)
    poller.register(stream.transport.get_extra_info("socket").fileno(), select.POLLIN)
    return not poller.poll(0)


def spare_for(base_url: str) -> SpareConnection | None:
    """A spare connection for an engine reached by plain HTTP at an address (a local one)."""
    url = URL(base_url)
    if url.scheme != "http" or url.host is None or url.port is None or not _is_ip(url.host):
        return None
    return SpareConnection(url)


@functools.lru_cache(maxsize=256)
def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


_SET_HERE = frozenset({"host", "content-length", "connection", "transfer-encoding"})
