"""Live events: what changes in the gateway, for views that follow it (/gateway/events).

Publishers (the supervisor, the request handler, the log) never wait and never fail: a
follower that falls behind loses events and is told so. Events are numbered; the last
few thousand are kept, so a follower that reconnects resumes after the last it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

KEPT = 2000  # events a reconnecting follower can resume from
FOLLOWER_BACKLOG = 1000  # events a follower may fall behind before it loses some


class LiveKind(StrEnum):
    TRANSITION = "transition"  # an engine's machine changed state
    GRANT = "grant"  # a request got its engine
    RELEASE = "release"  # ... and let go of it (served, requeued, or failed)
    SELECTION = "selection"  # the variant chosen for a request, and why
    EVICTION = "eviction"  # an engine drained to make room for another
    QUEUE = "queue"  # the waiting requests by model changed
    COMPLETION = "completion"  # a request finished: its row in the activity table
    LOG = "log"  # a log line
    LOST = "lost"  # the follower fell behind: `data.count` events were dropped


@dataclass(frozen=True)
class LiveEvent:
    id: int
    kind: LiveKind
    data: dict[str, Any]
    at: float  # wall clock


class LiveEvents:
    """A numbered ring of recent events, and the followers fed from it."""

    def __init__(self, kept: int = KEPT) -> None:
        # Ids go on from the start's wall clock (microseconds): a follower's id from an
        # earlier run of the gateway is older than every one of this run, never mistaken
        # for one of them (it then gets the state afresh).
        self._ids = itertools.count(int(time.time() * 1_000_000))
        self._recent: deque[LiveEvent] = deque(maxlen=kept)
        self._followers: set[Follower] = set()

    def publish(self, kind: LiveKind, data: dict[str, Any]) -> None:
        """Record an event and offer it to every follower (from the event loop's thread)."""
        event = LiveEvent(next(self._ids), kind, data, time.time())
        self._recent.append(event)
        for follower in self._followers:
            follower.offer(event)

    def since(self, last_id: int) -> list[LiveEvent]:
        """The kept events after `last_id` (all kept ones for 0)."""
        return [event for event in self._recent if event.id > last_id]

    @contextlib.contextmanager
    def follow(self) -> Iterator[Follower]:
        """A follower of the events published from now on, while the block runs."""
        follower = Follower(asyncio.Queue(maxsize=FOLLOWER_BACKLOG))
        self._followers.add(follower)
        try:
            yield follower
        finally:
            self._followers.discard(follower)


@dataclass(eq=False)
class Follower:
    queue: asyncio.Queue[LiveEvent]
    lost: int = 0  # events dropped since the last one it got

    def offer(self, event: LiveEvent) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.lost += 1

    async def next(self) -> LiveEvent:
        """The next event; a LOST event first when some were dropped."""
        if self.lost:
            lost, self.lost = self.lost, 0
            return LiveEvent(0, LiveKind.LOST, {"count": lost}, time.time())
        return await self.queue.get()
