"""What the gateway keeps in aiohttp's request while serving it, under typed keys."""

from __future__ import annotations

from aiohttp import web

from gateway.server.record import RequestRecord

REQUEST_ID = web.RequestKey("request_id", str)  # the client's X-Request-Id or a fresh one
MODEL = web.RequestKey("model", str)  # the model asked for, once resolved
RECORD = web.RequestKey("record", RequestRecord)  # its row in the activity table
FIRST_BYTE_AT = web.RequestKey("first_byte_at", float)  # monotonic: the answer's headers went out
FIRST_TOKEN_AT = web.RequestKey("first_token_at", float)  # monotonic: the first generated token went out
CLIENT_LEFT = web.RequestKey("client_left", bool)  # the client left before the answer's end
