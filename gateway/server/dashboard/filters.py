"""Which live events a follower of /gateway/events asks for (its query string)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.errors import InvalidRequest
from gateway.utils.live import LiveEvent, LiveKind

STATE = "state"  # not a live event: what a page needs to draw from scratch, sent first
KINDS = frozenset({STATE, *(kind.value for kind in LiveKind)})
LOG_SOURCES = ("engine", "gateway")


@dataclass(frozen=True)
class EventFilter:
    """?kinds=transition,completion (default: all), and for log lines ?log=engine or
    ?log=gateway and ?log_contains=TEXT (any case). A follower always hears of lost events."""

    kinds: frozenset[str] = KINDS
    log_source: str | None = None
    log_contains: str = ""

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> EventFilter:
        source = query.get("log")
        if source is not None and source not in LOG_SOURCES:
            raise InvalidRequest("'log' must be 'engine' or 'gateway'", param="log")
        return cls(_kinds(query.get("kinds")), source, query.get("log_contains", "").lower())

    def wants(self, event: LiveEvent) -> bool:
        if event.kind is LiveKind.LOST:
            return True
        if event.kind.value not in self.kinds:
            return False
        return event.kind is not LiveKind.LOG or self.wants_line(event.data)

    def wants_line(self, line: dict[str, Any]) -> bool:
        if self.log_source is not None and line.get("source") != self.log_source:
            return False
        return self.log_contains in f"{line.get('engine') or ''} {line.get('message', '')}".lower()


def _kinds(listed: str | None) -> frozenset[str]:
    if listed is None:
        return KINDS
    kinds = frozenset(kind.strip() for kind in listed.split(",") if kind.strip())
    if not kinds or not kinds <= KINDS:
        raise InvalidRequest(
            f"'kinds' is a comma-separated list of {', '.join(sorted(KINDS))}; got {listed!r}", param="kinds"
        )
    return kinds
