"""EngineStream's reading of an engine's answer at the protocol level: heads and chunked
bodies split anywhere, bodies of a length or up to the close, and what breaks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.engine.stream import (
    ChunkedBody,
    EngineStream,
    SpareConnection,
    StreamBroken,
    open_stream,
    send,
    spare_for,
)

EVENTS = [b'data: {"a":1}\n\n', b'data: {"b":"' + b"x" * 300 + b'"}\n\n', b"data: [DONE]\n\n"]


def chunked(payloads: list[bytes], extension: bytes = b"") -> bytes:
    framed = b"".join(b"%x%s\r\n%s\r\n" % (len(p), extension, p) for p in payloads)
    return framed + b"0\r\n\r\n"


def splits(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64, 10_000])
@pytest.mark.parametrize("extension", [b"", b";name=value"])
def test_a_chunked_body_split_anywhere_gives_its_payloads(size: int, extension: bytes) -> None:
    body = ChunkedBody()
    out = [piece for part in splits(chunked(EVENTS, extension), size) for piece in body.feed(part)]
    assert b"".join(out) == b"".join(EVENTS)
    assert body.done


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64, 10_000])
@pytest.mark.parametrize("extension", [b"", b";name=value"])
def test_chunks_passed_through_as_they_came_split_anywhere_less_the_last_chunk(
    size: int, extension: bytes
) -> None:
    body = ChunkedBody()
    framed = chunked(EVENTS, extension)
    passed = b"".join(body.pass_through(part) for part in splits(framed + b"Trailer: x\r\n\r\n", size))
    assert passed == framed[: -len(b"0\r\n\r\n")]  # the client's own last chunk ends it
    assert body.done


def test_passing_through_starts_only_where_a_chunk_starts() -> None:
    body = ChunkedBody()
    framed = chunked(EVENTS)
    first = framed.index(b"\r\n", 3) + 2  # the first whole chunk
    assert body.feed(framed[:first]) == [EVENTS[0]] and body.at_chunk_start()
    assert not (body.feed(framed[first : first + 10]) and body.at_chunk_start())  # inside a payload
    with pytest.raises(ValueError):
        ChunkedBody().pass_through(b"zz\r\nnonsense")


def test_one_whole_chunk_a_read_is_one_payload() -> None:
    body = ChunkedBody()
    assert body.feed(b"f\r\n" + EVENTS[0] + b"\r\n") == [EVENTS[0]]
    assert body.feed(b"0\r\nTrailer: x\r\n\r\n") == [] and body.done


def test_a_body_that_is_not_chunked_is_refused() -> None:
    with pytest.raises(ValueError):
        ChunkedBody().feed(b"zz\r\nnonsense")


Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], object]


@pytest.fixture
async def engine() -> AsyncIterator[Callable[[Answer], asyncio.Future[str]]]:
    servers: list[asyncio.Server] = []
    heads: list[bytes] = []  # the request heads the engines got

    async def start(answer: Answer) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            await answer(reader, writer)  # type: ignore[misc]
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    start.heads = heads  # type: ignore[attr-defined]
    yield start  # type: ignore[misc]
    for server in servers:
        server.close()


async def read_all(url: str) -> tuple[int, bytes]:
    stream = await open_stream(url, "/v1/chat/completions", b"{}", {"Content-Type": "application/json"})
    head = await stream.head
    parts = []
    while part := await stream.read():
        parts.append(part)
    return head.status, b"".join(parts)


async def test_a_streamed_answer_in_small_pieces(engine) -> None:
    async def answer(reader, writer) -> None:
        data = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        for piece in splits(data + chunked(EVENTS), 3):
            writer.write(piece)
            await writer.drain()

    assert await read_all(await engine(answer)) == (200, b"".join(EVENTS))


async def test_a_body_of_a_length_and_one_up_to_the_close(engine) -> None:
    async def sized(reader, writer) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 5\r\n\r\nhello and more")

    async def to_close(reader, writer) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nall of it")

    assert await read_all(await engine(sized)) == (400, b"hello")
    assert await read_all(await engine(to_close)) == (200, b"all of it")


async def test_an_answer_cut_short_breaks_the_stream(engine) -> None:
    async def dies(reader, writer) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(EVENTS)[:40])

    async def not_http(reader, writer) -> None:
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")

    with pytest.raises(StreamBroken, match="closed the connection"):
        await read_all(await engine(dies))
    with pytest.raises(StreamBroken, match="not HTTP"):
        await read_all(await engine(not_http))


async def test_the_request_goes_out_as_http_with_its_body(engine) -> None:
    seen: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def echo(reader, writer) -> None:
        seen.set_result(await reader.readexactly(2))
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")

    url = await engine(echo)
    assert await read_all(url + "/prefix") == (204, b"")
    assert await seen == b"{}"
    line, *headers = engine.heads[-1].decode().split("\r\n")
    assert line == "POST /prefix/v1/chat/completions HTTP/1.1"  # the url's path comes first
    assert {"Content-Length: 2", "Connection: close", "Content-Type: application/json"} <= set(headers)


async def test_a_header_with_a_line_break_is_never_sent(engine) -> None:
    async def never(reader, writer) -> None:
        raise AssertionError("nothing should arrive")

    with pytest.raises(ValueError, match="line break"):
        await open_stream(await engine(never), "/v1/x", b"{}", {"Authorization": "Bearer a\r\nX-Evil: 1"})


class Engine:
    """A listening socket that counts its connections and reads a request head on each."""

    def __init__(self, close_at_once: bool = False) -> None:
        self.accepted: list[asyncio.StreamWriter] = []
        self.requested: list[int] = []  # the index of each connection a request came on
        self.closed = 0  # connections it closed without reading
        self.close_at_once = close_at_once
        self.url = ""
        self.changed = asyncio.Event()

    async def start(self) -> Engine:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def until(self, check: Callable[[], bool]) -> None:
        async with asyncio.timeout(5):
            while not check():
                self.changed.clear()
                await self.changed.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(self.accepted)
        self.accepted.append(writer)
        self.changed.set()
        if self.close_at_once:
            writer.close()
            await writer.wait_closed()
            self.closed += 1
            self.changed.set()
            return
        try:
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        self.requested.append(index)
        self.changed.set()
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
        writer.close()


async def request(url: str, spare: SpareConnection) -> int:
    """A request as the proxy sends it: on the spare if one is ready, else connected anew."""
    stream = spare.take()
    if stream is None:
        stream = await open_stream(url, "/v1/x", b"{}", {})
    else:
        send(stream, url, "/v1/x", b"{}", {})
    return (await stream.head).status


async def test_a_request_goes_out_on_the_spare_connection_opened_ahead_and_the_next_is_opened() -> None:
    engine = await Engine().start()
    spare = spare_for(engine.url)
    assert spare is not None
    spare.open_next()
    await engine.until(lambda: len(engine.accepted) == 1)
    assert await request(engine.url, spare) == 204
    assert engine.requested == [0]  # on the connection opened before the request
    await engine.until(lambda: len(engine.accepted) == 2)  # the next spare
    assert await request(engine.url, spare) == 204
    assert engine.requested == [0, 1]
    spare.close()
    await engine.until(lambda: len(engine.accepted) == 3)
    await asyncio.sleep(0.05)  # a closed spare opens nothing more
    assert len(engine.accepted) == 3


async def test_a_spare_the_engine_closed_or_one_too_old_is_not_used(monkeypatch) -> None:
    closing = await Engine(close_at_once=True).start()
    spare = spare_for(closing.url)
    assert spare is not None
    spare.open_next()
    await closing.until(lambda: closing.closed == 1)  # on loopback its FIN is here as it closes
    assert spare.take() is None  # closed by the engine: the request would connect itself
    spare.close()

    engine = await Engine().start()
    spare = spare_for(engine.url)
    assert spare is not None
    spare.open_next()
    await engine.until(lambda: len(engine.accepted) == 1)
    monkeypatch.setattr("gateway.engine.stream.SPARE_MAX_AGE", 0.0)
    assert await request(engine.url, spare) == 204
    assert engine.requested and 0 not in engine.requested  # a fresh connection, not the aged spare
    spare.close()


def test_only_an_engine_at_an_address_over_plain_http_gets_a_spare() -> None:
    assert spare_for("http://127.0.0.1:8080") is not None
    assert spare_for("http://[::1]:8080") is not None
    assert spare_for("http://localhost:8080") is None  # a name to look up: connected as before
    assert spare_for("https://127.0.0.1:8443") is None


def test_a_read_of_several_whole_chunks_gives_each_payload_and_sizes_are_plain_hex() -> None:
    body = ChunkedBody()
    assert body.feed(chunked(EVENTS)[:-5]) == EVENTS  # all but the last chunk's "0\r\n\r\n"
    assert not body.done
    for size in (b"0x1f", b"1_f", b"+1f", b""):  # int() would take the first three
        with pytest.raises(ValueError):
            ChunkedBody().feed(size + b"\r\n" + b"x" * 31 + b"\r\n")


async def test_a_chunk_the_engine_broke_off_inside_is_completed_for_the_clients_framing(engine) -> None:
    framed = chunked(EVENTS)
    second = framed.index(b"\r\n", 3) + 2  # where the second chunk starts
    cut = framed.index(b"x" * 100)  # inside its payload
    relaying = asyncio.Event()

    async def dies(reader, writer) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + framed[:second])
        await relaying.wait()
        writer.write(framed[second:cut])

    stream = await open_stream(await engine(dies), "/v1/x", b"{}", {})
    await stream.head
    first = await stream.read()
    passed: list[bytes] = []
    assert stream.relay_chunks(passed.append)
    relaying.set()
    assert await stream.ended == "the engine closed the connection"
    client = ChunkedBody()  # what the client reads: whole chunks, the cut one padded
    payloads = client.feed(b"".join(passed) + stream.chunk_end() + b"0\r\n\r\n")
    assert first == EVENTS[0] and client.done
    assert payloads[-1].startswith(b'data: {"b":"') and payloads[-1].endswith(b"\n\n")


async def relayed(
    engine, answer_rest: Callable[[asyncio.StreamWriter], Awaitable[None]]
) -> tuple[bytes, EngineStream]:
    """A stream whose first event is read, then passed through: what the engine sends
    after that (`answer_rest`), as the client's side got it."""
    framed = chunked(EVENTS)
    second = framed.index(b"\r\n", 3) + 2
    relaying = asyncio.Event()

    async def answer(reader, writer) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + framed[:second])
        await relaying.wait()
        await answer_rest(writer)

    stream = await open_stream(await engine(answer), "/v1/x", b"{}", {})
    await stream.head
    assert await stream.read() == EVENTS[0]
    passed: list[bytes] = []
    assert stream.relay_chunks(passed.append)
    relaying.set()
    await stream.ended
    return b"".join(passed), stream


async def test_a_broken_size_line_after_a_chunk_begun_before_still_completes_that_chunk(engine) -> None:
    framed = chunked(EVENTS)
    second = framed.index(b"\r\n", 3) + 2
    third = framed.index(b"data: [DONE]") - 4  # where the third chunk's size line starts

    async def rest(writer: asyncio.StreamWriter) -> None:
        writer.write(framed[second : second + 50])
        await writer.drain()
        await asyncio.sleep(0.05)  # (two reads: the chunk begun in one, completed in the next)
        writer.write(framed[second + 50 : third] + b"zz\r\n")

    passed, stream = await relayed(engine, rest)
    assert stream.ended.result() == "a chunked body that does not parse"
    client = ChunkedBody()
    payloads = client.feed(passed + (stream.chunk_end() or b"") + b"0\r\n\r\n")
    assert client.done and payloads == [EVENTS[1]]


async def test_a_chunk_broken_off_far_from_its_end_is_not_padded(engine) -> None:
    async def huge(writer: asyncio.StreamWriter) -> None:
        writer.write(b"%x\r\n" % 10_000_000 + b"data: " + b"x" * 100)  # 10 MB declared, then the close

    passed, stream = await relayed(engine, huge)
    assert passed.startswith(b"989680\r\n") and stream.ended.result() is not None
    assert stream.chunk_end() is None  # the client's connection is cut instead
