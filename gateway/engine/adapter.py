"""EngineAdapter: what the gateway needs to know of one engine type, behind one interface.

How an engine is started (or reached), how to know it is ready, how it counts a prompt
(exactly, or not at all), which requests it cannot serve, and how it says a prompt did
not fit. The supervisor and the proxy see only this interface; `llama.cpp`, `openai` and
`remote` implement it (gateway/engine/llamacpp.py, openai.py, remote.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from gateway.config.schema import EngineKind, Model, Variant
from gateway.engine.client import EngineClient
from gateway.engine.counting import TokenCounter
from gateway.models import Room


class StartFailed(Exception):
    """An engine did not become ready; `kind` is spawn, exited, timeout or unreachable."""

    def __init__(self, kind: str, message: str, last_lines: list[str] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.last_lines = last_lines or []


@dataclass(frozen=True)
class Launch:
    """How to start a local engine: its command line, and where it will listen."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    port: int | None = None  # given on its command line; None: read from its output
    listening_pattern: str | None = None  # the output line that names its port (group 1)


@dataclass(frozen=True)
class RunningRoom:
    """What a ready engine offers, as it reports it (or as its config declares it)."""

    slot_context: int  # the context one request really gets
    slots: int  # sequences it runs at once
    kv_budget: int | None  # tokens concurrent requests share; None: each has its own
    slot_cap: int | None  # sequences the gateway sends at once; None: no cap


class EngineAdapter(ABC):
    """One engine type. Stateless: what differs per model is read from the model."""

    kind: EngineKind
    # Whether a connection is opened ahead of the next request: for engines known to serve
    # several connections at once (one held idle must not starve a one-at-a-time server).
    spare_connection: bool = False

    @abstractmethod
    def launch(self, model: Model, variant: Variant, slot_dir: str) -> Launch | None:
        """The engine's command line (raises StartFailed("spawn")); None: nothing to start."""

    def base_url(self, model: Model, port: int) -> str:
        return f"http://127.0.0.1:{port}"

    def health_path(self, model: Model) -> str:
        return "/health"

    def request_headers(self, model: Model) -> dict[str, str]:
        """Headers every call to the engine carries (an upstream's key)."""
        return {}

    @abstractmethod
    def capacity(self, variant: Variant, model: Model) -> Room:
        """The room a variant gives requests, predicted before a start."""

    @abstractmethod
    async def running_room(self, client: EngineClient, model: Model, variant: Variant) -> RunningRoom:
        """What the ready engine offers."""

    def serves(self, model: Model, variant: Variant, kind: str, path: str) -> str | None:
        """Why this variant's engine cannot serve a request (400), or None."""
        return None

    def unserved(self, model: Model, path: str) -> str | None:
        """Why the engine type does not implement an endpoint at all (501), or None."""
        return None

    def rewrite(self, model: Model, body: dict[str, Any]) -> dict[str, Any]:
        """The body as the engine must get it; `body` itself when nothing changes."""
        return body

    def counter(self, model: Model) -> TokenCounter | None:
        """How the engine counts a prompt's tokens exactly; None: it cannot."""
        return None

    @abstractmethod
    def context_overflow(self, status: int, body: bytes) -> int | None:
        """The prompt's token count when the engine refused it as too long, else None."""

    async def probe(self, client: EngineClient, timeout: float) -> str | None:
        """None while the engine is well; else what is wrong. A local engine is unwell
        only when it leaves /health unanswered (it is frozen): it may refuse connections
        while every HTTP thread serves a stream, and its exit is seen apart."""
        if await client.stalls(timeout):
            return f"no answer to {client.health_path} within {timeout:g}s"
        return None

    async def busy_tasks(self, client: EngineClient) -> frozenset[int]:
        """The ids of the tasks its slots process now. Only engines with a shared KV
        cache are asked (llama.cpp); the others keep no room for abandoned requests."""
        return frozenset()

    async def clear_idle_slots(self, client: EngineClient) -> None:
        """Erase what idle slots keep; only engines with a shared KV cache keep any."""
        return None
