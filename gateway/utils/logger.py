"""Logging for operators: plain lines for a terminal or JSON lines, plus a recent-lines ring."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections import deque

from aiohttp.http_exceptions import BadHttpMessage

RECENT_LINES = 1000
FOLLOW_BACKLOG = 1000


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class RecentLines(logging.Handler):
    """Keeps the last formatted lines for /gateway/logs and feeds live followers."""

    def __init__(self, size: int = RECENT_LINES) -> None:
        super().__init__()
        self.lines: deque[str] = deque(maxlen=size)
        self._followers: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue[str]]] = set()

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        self.lines.append(line)
        for loop, queue in list(self._followers):
            loop.call_soon_threadsafe(_offer, queue, line)

    def follow(self) -> asyncio.Queue[str]:
        """A queue of the lines logged from now on; `unfollow` it when done."""
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=FOLLOW_BACKLOG)
        self._followers.add((asyncio.get_running_loop(), queue))
        return queue

    def unfollow(self, queue: asyncio.Queue[str]) -> None:
        self._followers = {(loop, q) for loop, q in self._followers if q is not queue}


def _bad_http_in_one_line(record: logging.LogRecord) -> bool:
    """A malformed request (say, a 100 KB header) is the client's fault: aiohttp has
    answered it with 400 already, so one warning line, not an error with a traceback."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, BadHttpMessage):
        # Its type only: aiohttp's message quotes the raw header bytes, API keys included.
        record.msg, record.args = "bad HTTP request from a client (answered 400): %s", (type(error).__name__,)
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


def _offer(queue: asyncio.Queue[str], line: str) -> None:
    # A follower that cannot keep up misses lines rather than slowing the gateway.
    with contextlib.suppress(asyncio.QueueFull):
        queue.put_nowait(line)


def setup_logging(level: str = "info", fmt: str = "text") -> RecentLines:
    """Configure the root logger once; return the ring of recent lines."""
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
    else:
        formatter = logging.Formatter(
            "%(asctime)s.%(msecs)03d %(levelname)-5s %(name)s: %(message)s",
            datefmt="%Y-%m-%d %H:%M:%S",
        )
        formatter.converter = time.localtime
    stream = logging.StreamHandler(sys.stderr)
    recent = RecentLines()
    root = logging.getLogger()
    root.handlers.clear()
    for handler in (stream, recent):
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("aiohttp.access", "transitions"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(_bad_http_in_one_line)
    return recent
