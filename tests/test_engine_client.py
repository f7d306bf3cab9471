"""EngineClient against raw sockets: `stalls` (only an engine that never answers is
frozen, not one that drops a connection, as llama-server does while all its HTTP threads
serve streams), and JSON calls to an engine that dies mid-answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web

from gateway.engine.client import EngineClient, EngineRequestError, new_session
from gateway.engine.llamacpp import LlamaCppEngine

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _stalls(handler: Handler, timeout: float = 0.3) -> bool:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pooled, fresh = new_session(reuse=True), new_session(reuse=False)
    try:
        return await EngineClient(pooled, fresh, f"http://127.0.0.1:{port}").stalls(timeout)
    finally:
        await pooled.close()
        await fresh.close()
        server.close()


async def test_an_engine_that_never_answers_stalls() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        await asyncio.sleep(5)  # reads the request, never answers (like SIGSTOP)

    assert await _stalls(silent)


async def test_a_dropped_connection_or_an_answer_is_no_stall() -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    assert not await _stalls(drop)
    assert not await _stalls(answer)


async def test_an_answer_cut_mid_body_is_an_engine_request_error() -> None:
    """An engine killed while it sends a JSON answer (a token count, say): the caller gets
    EngineRequestError, which it treats as an engine failure (retry), not an unexpected
    exception (the 12 s soak got a 500 for a good request this way)."""

    async def dies_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 27090\r\n\r\n{")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(dies_mid_body, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pooled, fresh = new_session(reuse=True), new_session(reuse=False)
    try:
        client = EngineClient(pooled, fresh, f"http://127.0.0.1:{port}")
        with pytest.raises(EngineRequestError, match="POST /tokenize"):
            await client.post_json("/tokenize", {"content": "hi"})
    finally:
        await pooled.close()
        await fresh.close()
        server.close()


async def test_erasing_idle_slots_does_not_wait_for_a_slot_that_became_busy() -> None:
    """A slot idle when /slots was read may take a request before its erase arrives;
    llama-server then defers the erase until that request ends (seconds). The erase of
    the others goes on, and the gateway does not wait for the deferred one."""
    erased: list[int] = []

    async def slots(request: web.Request) -> web.Response:
        return web.json_response([{"id": 0, "is_processing": False}, {"id": 1, "is_processing": False}])

    async def erase(request: web.Request) -> web.Response:
        slot = int(request.match_info["slot"])
        if slot == 1:
            await asyncio.sleep(3)  # busy meanwhile: deferred until its request ends
        erased.append(slot)
        return web.json_response({"id_slot": slot, "n_erased": 10})

    app = web.Application()
    app.add_routes([web.get("/slots", slots), web.post("/slots/{slot}", erase)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    pooled, fresh = new_session(reuse=True), new_session(reuse=False)
    try:
        client = EngineClient(pooled, fresh, f"http://127.0.0.1:{port}")
        started = time.monotonic()
        await LlamaCppEngine().clear_idle_slots(client)
        assert time.monotonic() - started < 2
        assert erased == [0]
    finally:
        await pooled.close()
        await fresh.close()
        await runner.cleanup()
