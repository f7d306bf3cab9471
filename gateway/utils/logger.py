"""Logging for operators: plain lines for a terminal or JSON lines, plus a recent-lines ring."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import deque

RECENT_LINES = 1000


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
    """Keeps the last formatted lines in memory for /gateway/logs."""

    def __init__(self, size: int = RECENT_LINES) -> None:
        super().__init__()
        self.lines: deque[str] = deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


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
    return recent
