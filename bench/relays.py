"""Two reference proxies the gateway's hop is measured against (bench only).

`aiohttp`: a plain aiohttp pass-through, what a Python proxy usually is: the request read
by aiohttp's server, sent with a ClientSession, the answer copied with `iter_any`.

`raw`: the floor of a Python relay on this machine: asyncio Protocols on uvloop, the
client's request sent to the engine on a fresh connection as it came, the engine's bytes
written to the client as they arrive, nothing parsed. It serves one request per client
connection; it is no gateway (no model, no selection, no errors), only a yardstick.

Run as `python bench/relays.py aiohttp|raw LISTEN_PORT ENGINE_URL`.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import uvloop
from aiohttp import web
from yarl import URL

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


def aiohttp_app(engine: str) -> web.Application:
    session: list[aiohttp.ClientSession] = []

    async def start(_: web.Application) -> None:
        session.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)))

    async def stop(_: web.Application) -> None:
        await session[0].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        url = engine + request.path_qs
        async with session[0].request(request.method, url, data=body, headers=headers) as upstream:
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
            response = web.StreamResponse(status=upstream.status, headers=out)
            await response.prepare(request)
            async for data in upstream.content.iter_any():
                await response.write(data)
            await response.write_eof()
            return response

    app = web.Application()
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", relay)
    return app


class Upstream(asyncio.Protocol):
    """The engine's side: every byte it sends goes to the client as it arrives."""

    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class RawRelay(asyncio.Protocol):
    """The client's side: its request head and body go to a fresh engine connection."""

    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        self.pending = b""
        self.upstream: asyncio.Transport | None = None
        self.transport: asyncio.Transport | None = None
        self.connecting: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        upstream, _ = await loop.create_connection(lambda: Upstream(self.transport), *self.address)
        self.upstream = upstream  # type: ignore[assignment]
        if self.pending:
            upstream.write(self.pending)
            self.pending = b""

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending += data
        else:
            self.upstream.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def serve_raw(port: int, engine: str) -> None:
    url = URL(engine)
    loop = asyncio.get_running_loop()
    host, engine_port = url.host or "127.0.0.1", url.port or 80
    server = await loop.create_server(lambda: RawRelay(host, engine_port), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    kind, port, engine = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if kind == "aiohttp":
        uvloop.install()
        web.run_app(aiohttp_app(engine), host="127.0.0.1", port=port, print=None)
    else:
        uvloop.run(serve_raw(port, engine))


if __name__ == "__main__":
    main()
