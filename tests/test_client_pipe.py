"""ClientPipe's order of writes when the engine breaks off inside a chunk while the
client's buffer is full: the padding that completes the chunk goes out before anything
written after it (the error event), never held back for good."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import HttpVersion11

from gateway.engine.stream import ChunkedBody, EngineStream
from gateway.server.proxy import HIGH_WATER, ClientPipe


class Client:
    """The client's socket as the pipe sees it: what was written, and a buffer level."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.buffered = 0

    # the transport
    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def write(self, data: bytes) -> None:
        self.out += data

    def abort(self) -> None:
        raise AssertionError("the client's framing was not lost")

    # the response writer and the response (aiohttp frames what goes through it)
    async def drain(self) -> None:
        self.buffered = 0

    async def framed(self, data: bytes) -> None:
        self.out += b"%x\r\n%b\r\n" % (len(data), data)


async def test_the_padding_of_a_broken_chunk_is_written_even_when_the_client_buffer_is_full() -> None:
    client = Client()
    request: Any = type("Request", (), {"transport": client, "writer": client, "version": HttpVersion11})()
    response: Any = type("Response", (), {"write": staticmethod(client.framed)})()
    stream = EngineStream()
    stream.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\ndata:\r\n")
    pipe = ClientPipe(request, response, stream, None)
    running = asyncio.ensure_future(pipe.run(await stream.read()))
    while stream._chunk_sink is None:  # relaying begun
        await asyncio.sleep(0)
    stream.data_received(b"a\r\n12345")  # a chunk of 10 begun, 5 bytes of it
    client.buffered = HIGH_WATER + 1  # that write filled the client's buffer
    stream.connection_lost(None)  # and the engine broke off
    assert await running == "the engine closed the connection"
    await client.framed(b"data: {error}\n\n")  # the error event the relay writes next
    reader = ChunkedBody()
    reader.feed(bytes(client.out) + b"0\r\n\r\n")
    assert reader.done  # the client's framing held: the chunk was completed first
