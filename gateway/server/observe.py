"""Request metrics: count, duration and time to first byte of every model request, and
its record in the live events (the dashboard's activity table)."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.server.endpoints import ENDPOINTS
from gateway.server.keys import CLIENT_LEFT, FIRST_BYTE_AT, FIRST_TOKEN_AT, MODEL, RECORD
from gateway.utils.live import LiveEvents, LiveKind
from gateway.utils.metrics import Metrics

CLIENT_GONE = "499"  # the client left before its answer ended (nginx's convention)


def metrics_middleware(metrics: Metrics, live: LiveEvents) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in ENDPOINTS:
            return await handler(request)
        started = time.monotonic()
        status = "500"
        try:
            response = await handler(request)
            status = CLIENT_GONE if request.get(CLIENT_LEFT) else str(response.status)
            return response
        except asyncio.CancelledError:
            status = CLIENT_GONE
            raise
        finally:
            model, endpoint, ended = request.get(MODEL, ""), request.path, time.monotonic()
            metrics.requests.labels(model, endpoint, status).inc()
            metrics.duration.labels(model, endpoint).observe(ended - started)
            # A whole (non-streamed) answer goes out right after this: its first byte is now.
            first = request.get(FIRST_BYTE_AT, ended)
            metrics.first_byte.labels(model, endpoint).observe(first - started)
            record = request.get(RECORD)
            if record is not None:
                record.finish(int(status), request.get(FIRST_TOKEN_AT, ended) - started, ended - started)
                live.publish(LiveKind.COMPLETION, record.as_json())

    return middleware


async def mark_first_byte(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the headers, and with them the first byte, go out now."""
    request.setdefault(FIRST_BYTE_AT, time.monotonic())
