"""Server-sent events framing, in one place."""

from __future__ import annotations

import json
from typing import Any


def sse_data(payload: bytes | str) -> bytes:
    """One `data:` event; every line of a multi-line payload gets its own prefix."""
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    return "".join(f"data: {line}\n" for line in text.strip().split("\n")).encode() + b"\n"


def sse_json(value: Any) -> bytes:
    return sse_data(json.dumps(value))


def sse_comment(text: str) -> bytes:
    """A comment line: every SSE client ignores it; it keeps the connection alive."""
    return f": {text}\n\n".encode()


SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
