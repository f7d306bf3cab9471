"""EngineManager's health probe: a probe answered late while the engine's streams flow is
no freeze (the gateway's own loop was busy), one with nothing heard is, and so is one
whose only news came around a pause for a slow client (bytes that waited in the kernel)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from gateway.engine.manager import EngineInstance, EngineManager

STALL = "no answer to /health within 5s"


def instance_whose_probe_stalls(stream_speaks: bool, slow_client: bool = False) -> SimpleNamespace:
    stream = SimpleNamespace(last_read=0.0, last_paused=0.0)

    async def probe(client: object, timeout: float) -> str:
        await asyncio.sleep(0)
        now = asyncio.get_running_loop().time()
        if slow_client:  # its reading was paused, then resumed, while the probe waited
            stream.last_paused = now
        if stream_speaks:  # bytes of a stream arrive while the probe waits
            stream.last_read = now
        return STALL

    instance = SimpleNamespace(
        engine=SimpleNamespace(probe=probe),
        client=None,
        process=None,
        variant=SimpleNamespace(key="tiny@2048", timeouts=SimpleNamespace(health_check=5.0)),
        open_responses=[stream],
    )
    instance.heard_since = EngineInstance.heard_since.__get__(instance)
    return instance


async def test_a_stalled_probe_while_the_engines_streams_flow_is_no_freeze() -> None:
    assert await EngineManager().probe(instance_whose_probe_stalls(stream_speaks=True)) is None  # type: ignore[arg-type]


async def test_a_stalled_probe_with_nothing_heard_from_the_engine_is_a_freeze() -> None:
    assert await EngineManager().probe(instance_whose_probe_stalls(stream_speaks=False)) == STALL  # type: ignore[arg-type]


async def test_a_stalled_probe_whose_only_news_came_around_a_pause_is_a_freeze() -> None:
    instance = instance_whose_probe_stalls(stream_speaks=True, slow_client=True)
    assert await EngineManager().probe(instance) == STALL  # type: ignore[arg-type]
