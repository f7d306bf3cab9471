"""The live dashboard: GET /gateway/ui (the page), GET /gateway/events (what it follows)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from aiohttp import web

from gateway.config import GatewayConfig
from gateway.server.auth import DASHBOARD
from gateway.server.dashboard.kept import Kept
from gateway.server.dashboard.livelog import LiveLog
from gateway.server.dashboard.shell import Shell
from gateway.server.dashboard.stream import EventStream
from gateway.supervisor.supervisor import Supervisor


class Dashboard:
    def __init__(self, supervisor: Supervisor, config: Callable[[], GatewayConfig]) -> None:
        self._live = supervisor.live
        self._kept = Kept(supervisor.live)
        self._shell = Shell()
        self._events = EventStream(supervisor, config, self._kept)
        self._following: asyncio.Task[None] | None = None
        self._log: LiveLog | None = None

    def install(self, app: web.Application) -> None:
        app.router.add_get(DASHBOARD, self._shell.page)
        app.router.add_get(DASHBOARD + "/{name}", self._shell.file)
        app.router.add_get("/gateway/events", self._events.handle)
        app.router.add_route("*", "/", self._shell.home)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)

    def keys_changed(self) -> None:
        """A reload changed the keys: streams opened with an old one must not go on."""
        self._events.end_streams()

    def close(self) -> None:
        """Shutdown: end the event streams."""
        self._events.close()

    async def _start(self, app: web.Application) -> None:
        self._log = LiveLog(self._live)
        self._log.attach()
        self._following = asyncio.create_task(self._kept.keep_up(), name="dashboard-kept")

    async def _stop(self, app: web.Application) -> None:
        if self._log is not None:
            self._log.detach()
        if self._following is not None:
            self._following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._following
