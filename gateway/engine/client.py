"""EngineClient: HTTP to the engines over one shared, LLM-tuned client session."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import aiohttp

# Connection failures that happen before the engine saw the request: safe to send again.
# llama-server closes a connection after a streamed answer though it offers keep-alive.
_RETRYABLE = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


class EngineRequestError(Exception):
    """A call to an engine failed (connection refused, reset, or a bad answer)."""


class EngineAnswered(EngineRequestError):
    """The engine answered with an error status: it refused what it was sent."""

    def __init__(self, message: str, status: int, body: str) -> None:
        super().__init__(message)
        self.status = status
        self.body = body

    @property
    def engine_message(self) -> str:
        try:
            return str(json.loads(self.body)["error"]["message"])
        except (ValueError, KeyError, TypeError):
            return self.body[:500]


def new_session(reuse: bool) -> aiohttp.ClientSession:
    """A session for all engines: no total timeout (generations are long), no pool cap.

    llama-server closes idle keep-alive connections after 5 s and after streamed answers
    although it offers keep-alive, so a reused connection can be dead. Idempotent calls
    reuse connections (kept for 2 s) and retry once; a health probe that must see a
    frozen engine gets a fresh connection.
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=0, enable_cleanup_closed=True, force_close=not reuse, keepalive_timeout=2 if reuse else None
        ),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        auto_decompress=False,  # bodies pass through as the engine encoded them
        skip_auto_headers=("User-Agent",),
    )


class EngineClient:
    """Talks to one running engine at `base_url`."""

    def __init__(
        self,
        pooled: aiohttp.ClientSession,
        fresh: aiohttp.ClientSession,
        base_url: str,
        health_path: str = "/health",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._pooled = pooled  # for idempotent calls: health, tokenize, templates
        self._fresh = fresh  # for probes that need a connection of their own
        self.base_url = base_url
        self.health_path = health_path  # answered 200 when the engine is ready
        self.headers = dict(headers or {})  # sent with every call (an upstream's key)

    async def health(self, timeout: float) -> tuple[int, str]:
        """Status and body of GET `health_path`; (0, reason) when nothing answered."""
        try:
            async with self._pooled.get(
                self.base_url + self.health_path,
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                return resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return 0, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    async def stalls(self, timeout: float) -> bool:
        """Whether GET `health_path`, on a connection of its own, gets no answer in `timeout`.

        A frozen engine still accepts connections (the kernel does) but never answers. A
        refused or dropped connection is no stall: llama-server drops new connections
        while all its HTTP threads serve streams, and a dead engine's exit is seen apart."""
        try:
            async with self._fresh.get(
                self.base_url + self.health_path,
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                await resp.read()
        except TimeoutError:
            return True
        except aiohttp.ClientError:
            pass
        return False

    async def get_json(self, path: str) -> Any:
        return await self._json("GET", path, None)

    async def post_json(self, path: str, body: Mapping[str, Any]) -> Any:
        return await self._json("POST", path, body)

    async def _json(self, method: str, path: str, body: Mapping[str, Any] | None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        resp = await self._open(method, path, data, headers)
        async with resp:
            try:
                text = await resp.text()
            except aiohttp.ClientError as exc:  # the engine died mid-answer
                raise EngineRequestError(f"{method} {path}: {exc}") from exc
            if resp.status != 200:
                raise EngineAnswered(f"{method} {path}: HTTP {resp.status}: {text[:500]}", resp.status, text)
            try:
                return json.loads(text)
            except ValueError as exc:
                raise EngineRequestError(f"{method} {path}: not JSON: {text[:200]}") from exc

    async def _open(
        self, method: str, path: str, data: bytes | None, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        """Send an idempotent call and return the response with its body unread; one whose
        pooled connection turned out dead is sent once more. (Completions go out on
        connections of their own: gateway/engine/stream.py.)"""
        try:
            return await self._request(self._pooled, method, path, data, headers)
        except _RETRYABLE:
            pass
        try:
            return await self._request(self._pooled, method, path, data, headers)
        except _RETRYABLE as exc:
            raise EngineRequestError(f"{method} {path}: {exc}") from exc

    async def _request(
        self,
        session: aiohttp.ClientSession,
        method: str,
        path: str,
        data: bytes | None,
        headers: Mapping[str, str],
    ) -> aiohttp.ClientResponse:
        try:
            return await session.request(
                method,
                self.base_url + path,
                data=data,
                headers={**headers, **self.headers},
                allow_redirects=False,
            )
        except _RETRYABLE:
            raise
        except aiohttp.ClientError as exc:
            raise EngineRequestError(f"{method} {path}: {exc}") from exc
