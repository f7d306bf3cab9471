"""EngineStream's reading of an engine's answer at the protocol level: heads and chunked
bodies split anywhere, bodies of a length or up to the close, and what breaks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from gateway.engine.stream import ChunkedBody, StreamBroken, open_stream

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


def test_a_read_of_several_whole_chunks_gives_each_payload_and_sizes_are_plain_hex() -> None:
    body = ChunkedBody()
    assert body.feed(chunked(EVENTS)[:-5]) == EVENTS  # all but the last chunk's "0\r\n\r\n"
    assert not body.done
    for size in (b"0x1f", b"1_f", b"+1f", b""):  # int() would take the first three
        with pytest.raises(ValueError):
            ChunkedBody().feed(size + b"\r\n" + b"x" * 31 + b"\r\n")
