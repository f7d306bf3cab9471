"""The narrow interface through which the supervisor acts on the world: the
EngineManager, or a fake in tests."""

from __future__ import annotations

from typing import Any, Protocol

from gateway.config.schema import Model, Variant
from gateway.engine.manager import EngineInstance
from gateway.models import Room


class Effects(Protocol):
    def capacity(self, variant: Variant, model: Model) -> Room: ...

    def longest_token(self, variant: Variant) -> int | None:
        """The UTF-8 length of the longest token of the variant's model, when known."""
        ...

    def footprint(self, variant: Variant) -> int | None:
        """The bytes the variant's engine is predicted to take (declared, or estimated
        from its model file and context); None when unknown."""
        ...

    def measure(self, instance: EngineInstance) -> int | None:
        """The bytes the engine takes now (GPU memory, else resident); None if unknown."""
        ...

    def cached_prompts(self) -> dict[str, list[dict[str, Any]]]:
        """The conversations the prompt cache keeps, per model."""
        ...

    async def start(self, model: Model, variant: Variant) -> EngineInstance: ...

    async def stop(self, instance: EngineInstance) -> int:
        """Stop the engine (a llama.cpp engine's slots are saved to the prompt cache first)."""
        ...

    async def busy_tasks(self, instance: EngineInstance) -> frozenset[int]:
        """The ids of the tasks the engine's slots are processing now."""
        ...

    async def clear_idle_slots(self, instance: EngineInstance) -> None:
        """Have the engine erase what its idle slots keep."""
        ...

    async def probe(self, instance: EngineInstance) -> str | None:
        """None when the engine answers /health within its health_check timeout, else why not."""
        ...
