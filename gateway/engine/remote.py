"""RemoteEngine: an OpenAI-compatible upstream the gateway does not start.

Another llm-gateway, a vLLM on another box, a hosted API. Its engine has the same
lifecycle as a local one: `starting` while the first probe of its `health` path runs,
`ready` while probes pass, `crashed` when one fails. A `RemoteLink` stands where a local
engine has its process: there is nothing to spawn or kill.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque

from gateway.config.schema import EngineKind, Model, Variant
from gateway.engine.adapter import Launch, RunningRoom
from gateway.engine.client import EngineClient
from gateway.engine.openai import OpenAIEngine, upstream

PROBES_KEPT = 20  # the last probe failures, shown where a local engine shows its output


class RemoteEngine(OpenAIEngine):
    kind = EngineKind.REMOTE

    def launch(self, model: Model, variant: Variant, slot_dir: str) -> Launch | None:
        return None

    def base_url(self, model: Model, port: int) -> str:
        return upstream(model).url or ""

    def request_headers(self, model: Model) -> dict[str, str]:
        """The upstream's key, read from the environment variable the config names."""
        name = upstream(model).api_key_env
        key = os.environ.get(name) if name else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def running_room(self, client: EngineClient, model: Model, variant: Variant) -> RunningRoom:
        """The upstream serves every context its variants declare: one engine for all."""
        cap = upstream(model).max_in_flight
        return RunningRoom(model.largest_context, cap or 1, None, cap)

    async def probe(self, client: EngineClient, timeout: float) -> str | None:
        """Anything but 200 from its health path in time is a failure."""
        status, said = await client.health(timeout)
        if status == 200:
            return None
        return (
            f"GET {client.health_path} answered HTTP {status}"
            if status
            else f"GET {client.health_path}: {said}"
        )


class RemoteLink:
    """Stands for the process of an engine that runs elsewhere: it has no pid, its
    "output" is its failed probes, and it "exits" only when the gateway lets go of it."""

    pid: int | None = None

    def __init__(self, label: str, url: str) -> None:
        self.label = label
        self.argv = [url]
        self.started_at = time.time()
        self.started_monotonic = time.monotonic()
        self._lines: deque[str] = deque(maxlen=PROBES_KEPT)
        self._released = asyncio.Event()

    def note(self, line: str) -> None:
        self._lines.append(f"{self.label}: {line}")

    def last_lines(self, count: int = 20) -> list[str]:
        return list(self._lines)[-count:]

    async def wait(self) -> int:
        await self._released.wait()
        return 0

    async def stop(self, timeout: float) -> int:
        self._released.set()
        return 0

    def kill_now(self) -> None:
        self._released.set()
