"""GET /gateway/events: the live events as server-sent events.

Every event has `id:` (the live event's number; none for a `lost` notice), `event:` (its
kind) and `data:` (JSON). A client that sends `Last-Event-ID` gets what it missed since
then, when the kept events still reach back that far; otherwise (a first connect, a gap,
or an id from before a restart) it first gets a `state` event to draw from. Comments keep
an idle connection alive; the stream ends when the gateway shuts down.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway.config import GatewayConfig
from gateway.errors import InvalidRequest
from gateway.server.dashboard.filters import STATE, EventFilter
from gateway.server.dashboard.kept import Kept, payload
from gateway.server.dashboard.view import state_view
from gateway.server.sse import SSE_HEADERS, sse_comment
from gateway.supervisor.supervisor import Supervisor
from gateway.utils.live import Follower, LiveEvent, LiveKind

KEEPALIVE = 15.0  # seconds without a write before a comment goes out
BATCH = 256  # events written at once at most
ENCODED_KEPT = 4096  # frames kept encoded: followers read the same recent events
RETRY = b"retry: 1000\n\n"  # milliseconds an EventSource waits before it reconnects
HEADERS = {**SSE_HEADERS, "X-Accel-Buffering": "no", "X-Content-Type-Options": "nosniff"}


def frame(kind: str, data: Any, event_id: int = 0) -> bytes:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class EventStream:
    def __init__(self, supervisor: Supervisor, config: Callable[[], GatewayConfig], kept: Kept) -> None:
        self._supervisor = supervisor
        self._config = config
        self._kept = kept
        self._closing = asyncio.Event()
        self._cache: OrderedDict[int, bytes] = OrderedDict()  # frames by event id, newest last

    async def handle(self, request: web.Request) -> web.StreamResponse:
        wanted = EventFilter.from_query(request.query)
        resume = _last_event_id(request)
        response = web.StreamResponse(headers=HEADERS)
        with self._supervisor.live.follow() as follower:
            opening = self._opening(resume, wanted)  # before any await: nothing falls between
            try:
                await response.prepare(request)
                await response.write(opening)
                await self._pump(response, follower, wanted)
            except ConnectionResetError:
                pass  # the client left
        return response

    def close(self) -> None:
        """Shutdown: end every stream (they would hold the server open)."""
        self._closing.set()

    def end_streams(self) -> None:
        """End the streams open now (their clients reconnect, with the key they have now);
        later ones are served as ever."""
        self._closing.set()  # wakes every stream's wait at once
        self._closing.clear()

    def _opening(self, resume: int | None, wanted: EventFilter) -> bytes:
        newest = self._kept.catch_up()
        if resume is not None and resume <= newest:
            missed = self._supervisor.live.since(resume)
            if not missed or missed[0].id == resume + 1:
                return RETRY + self._frames(missed, wanted)
        # A first connect, or a resume the kept events no longer cover: a gap, or an id
        # from before a restart (then what the follower has seen is of another life).
        if STATE in wanted.kinds:
            view = state_view(self._supervisor, self._config(), self._kept, wanted, newest)
            return RETRY + frame(STATE, view, newest)
        return RETRY + (b"" if resume is None else frame(LiveKind.LOST.value, {"count": None}))

    async def _pump(self, response: web.StreamResponse, follower: Follower, wanted: EventFilter) -> None:
        closing = asyncio.ensure_future(self._closing.wait())
        upcoming: asyncio.Future[LiveEvent] | None = None
        written = time.monotonic()
        try:
            while not closing.done():
                upcoming = upcoming or asyncio.ensure_future(follower.next())
                quiet = KEEPALIVE - (time.monotonic() - written)
                await asyncio.wait((upcoming, closing), timeout=quiet, return_when=asyncio.FIRST_COMPLETED)
                chunk = b""
                if upcoming.done():
                    chunk = self._frames([upcoming.result(), *await _waiting(follower)], wanted)
                    upcoming = None
                if not chunk and time.monotonic() - written >= KEEPALIVE:
                    chunk = sse_comment("keep-alive")
                if chunk:
                    await response.write(chunk)
                    written = time.monotonic()
        finally:
            closing.cancel()
            if upcoming is not None:
                upcoming.cancel()

    def _frames(self, events: list[LiveEvent], wanted: EventFilter) -> bytes:
        return b"".join(self._encoded(event) for event in events if wanted.wants(event))

    def _encoded(self, event: LiveEvent) -> bytes:
        """An event's frame, encoded once for every follower (each encoding its own cost
        the gateway 10 ms per request with 100 followers)."""
        encoded = self._cache.get(event.id)
        if encoded is None:
            engines = self._engines() if event.kind is LiveKind.TRANSITION else {}
            encoded = self._cache[event.id] = _frame(event, engines)
            if len(self._cache) > ENCODED_KEPT:
                self._cache.popitem(last=False)
        return encoded

    def _engines(self) -> dict[str, dict[str, Any]]:
        return {engine["model"]: engine for engine in self._supervisor.snapshot()["engines"]}


def _frame(event: LiveEvent, engines: dict[str, dict[str, Any]]) -> bytes:
    data = payload(event)
    if event.kind is LiveKind.TRANSITION:
        # The engine as it is now (its pid, variant, memory): a transition names only states.
        data["engine"] = engines.get(data["model"])
    return frame(event.kind.value, data, event.id)


async def _waiting(follower: Follower) -> list[LiveEvent]:
    """The events already there (awaiting them does not suspend), up to a batch."""
    events: list[LiveEvent] = []
    while len(events) < BATCH and (follower.lost or not follower.queue.empty()):
        events.append(await follower.next())
    return events


def _last_event_id(request: web.Request) -> int | None:
    value = request.headers.get("Last-Event-ID", "").strip()
    if not value:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 20):
        raise InvalidRequest("Last-Event-ID must be an event id this stream sent", param="Last-Event-ID")
    return int(value)
