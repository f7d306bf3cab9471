"""Log lines as live events: the dashboard shows the gateway's log, the engines' output
(logged by gateway/engine/process.py as `[model@context pid=N] line`) told apart."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from typing import Any

from gateway.utils.live import LiveEvents, LiveKind

ENGINE_LOGGER = "gateway.engine"
# "[model@context pid=N] line": a model's name may hold spaces and brackets.
ENGINE_LINE = re.compile(r"^\[(?P<engine>.+?@\d+) pid=(?P<pid>\d+)\] ?(?P<line>.*)$", re.DOTALL)


def log_event(record: logging.LogRecord) -> dict[str, Any]:
    """A log record as a `log` event's data: `source` is "engine" for an engine's own output."""
    message = record.getMessage()
    output = ENGINE_LINE.match(message) if record.name == ENGINE_LOGGER else None
    return {
        "time": record.created,
        "level": record.levelname.lower(),
        "logger": record.name,
        "source": "engine" if output else "gateway",
        "engine": output["engine"] if output else None,
        "message": output["line"] if output else message,
    }


class LiveLog(logging.Handler):
    """Publishes every log record the root logger passes on; records from other threads
    (a config run in a worker thread) are handed to the event loop's thread."""

    def __init__(self, live: LiveEvents) -> None:
        super().__init__()
        self._live = live
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        data = log_event(record)
        if threading.get_ident() == self._thread:
            self._live.publish(LiveKind.LOG, data)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._live.publish, LiveKind.LOG, data)

    def attach(self) -> None:
        logging.getLogger().addHandler(self)

    def detach(self) -> None:
        logging.getLogger().removeHandler(self)
