"""What a page that connects now is shown of the past: the last finished requests, log
lines and evictions, and the queue as last published, taken from the live events."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from gateway.utils.live import LiveEvent, LiveEvents, LiveKind

ACTIVITY_KEPT = 300  # finished requests: the activity table's rows
LOGS_KEPT = 300
EVICTIONS_KEPT = 50
LOOK_INTERVAL = 0.25  # seconds between looks at the live events


class Kept:
    def __init__(self, live: LiveEvents) -> None:
        self._live = live
        self._seen = 0  # the id of the last event taken in
        self.activity: deque[dict[str, Any]] = deque(maxlen=ACTIVITY_KEPT)
        self.logs: deque[dict[str, Any]] = deque(maxlen=LOGS_KEPT)
        self.evictions: deque[dict[str, Any]] = deque(maxlen=EVICTIONS_KEPT)
        self.queue: dict[str, Any] = {}  # waiting requests by model: count, oldest arrival
        self._kept = {
            LiveKind.COMPLETION: self.activity,
            LiveKind.LOG: self.logs,
            LiveKind.EVICTION: self.evictions,
        }

    def catch_up(self) -> int:
        """Take in what was published since the last look; the id of the newest event
        published, 0 before the first."""
        for event in self._live.since(self._seen):
            self._take(event)
        return self._seen

    async def keep_up(self) -> None:
        """Run for the server's life, taking in what was published a few times a second:
        the ring holds seconds of a busy gateway's events, and a follower woken for each
        one cost the gateway 8% more CPU per request."""
        while True:
            self.catch_up()
            await asyncio.sleep(LOOK_INTERVAL)

    def _take(self, event: LiveEvent) -> None:
        self._seen = event.id
        if event.kind is LiveKind.QUEUE:
            self.queue = event.data["models"]
        elif (kept := self._kept.get(event.kind)) is not None:
            kept.append(payload(event))


def payload(event: LiveEvent) -> dict[str, Any]:
    """An event's data as the page gets it: with the time it was published, unless the
    data has a time of its own (a request's arrival, a transition's)."""
    return {"at": event.at, **event.data}
