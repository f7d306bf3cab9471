"""EngineManager's health probe: a probe answered late while the engine's streams flow is
no freeze (the gateway's own loop was busy), one with nothing heard is, and so is one
whose only news came around a pause for a slow client (bytes that waited in the kernel).

Its stop: SIGTERM only once no slot decodes (llama-server's signal handler can deadlock
mid-decode); SIGKILL at once when one still decodes after the settle wait, or when /slots
does not answer; idle slots saved unless /slots does not answer."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from gateway.engine.client import EngineRequestError
from gateway.engine.manager import SETTLE_WAIT, EngineInstance, EngineManager
from gateway.engine.prompt_cache import SAVE_BUDGET

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


class StoppingEngine:
    """An engine being stopped: its slots decode until `settle()` (its /slots never
    answers if `silent`); it records the prompt cache's saves and the stop the manager
    asks of its process (the timeout: 0 is SIGKILL at once)."""

    def __init__(self, stop_timeout: float = 5.0, slots_answer: bool = True, silent: bool = False) -> None:
        self.settled = asyncio.Event()
        self.looked_again = asyncio.Event()  # /slots was read again after it showed a busy slot
        self.looks = 0
        self.stopped_with: list[float] = []
        self.busy_while_stopped: list[bool] = []
        self.saved: list[str] = []
        self.save_budgets: list[float] = []
        self.forgotten = 0
        self._slots_answer = slots_answer
        self._silent = silent
        self.instance = SimpleNamespace(
            engine=SimpleNamespace(busy_tasks=self._busy_tasks),
            client=None,
            model=None,
            process=SimpleNamespace(stop=self._stop),
            variant=SimpleNamespace(key="tiny@2048", timeouts=SimpleNamespace(stop=stop_timeout)),
            exited=asyncio.get_running_loop().create_future(),
            spare=None,
            prompts=SimpleNamespace(save_all=self._save_all, forget_engine=self._forget_engine),
            where="pid 1 port 2",
        )

    def settle(self) -> None:
        self.settled.set()

    async def _busy_tasks(self, client: object) -> frozenset[int]:
        self.looks += 1
        if self.looks >= 2:
            self.looked_again.set()
        if self._silent:
            await asyncio.Event().wait()
        if not self._slots_answer:
            raise EngineRequestError("GET /slots: HTTP 501: slots endpoint is disabled")
        return frozenset() if self.settled.is_set() else frozenset({7})

    async def _save_all(self, client: object, model: object, variant: SimpleNamespace, budget: float) -> None:
        self.saved.append(variant.key)
        self.save_budgets.append(budget)

    def _forget_engine(self, client: object) -> None:
        self.forgotten += 1

    async def _stop(self, timeout: float) -> int:
        self.stopped_with.append(timeout)
        self.busy_while_stopped.append(not self.settled.is_set())
        return 0 if timeout > 0 else -9


async def test_an_engine_is_sent_sigterm_only_once_its_slots_stop_decoding() -> None:
    engine = StoppingEngine()
    stopping = asyncio.create_task(EngineManager().stop(engine.instance))  # type: ignore[arg-type]
    await asyncio.wait_for(engine.looked_again.wait(), 5)
    assert engine.stopped_with == []  # it saw a slot decoding: no signal yet
    engine.settle()
    assert await asyncio.wait_for(stopping, 5) == 0
    assert engine.stopped_with == [5.0] and engine.busy_while_stopped == [False]
    assert engine.saved == ["tiny@2048"] and engine.save_budgets == [SAVE_BUDGET] and engine.forgotten == 1


async def test_an_engine_still_decoding_is_killed_at_once_after_its_idle_slots_are_saved(caplog) -> None:
    # llama-server decodes a non-stream whose client left on to max_tokens: no waiting
    # for it beyond the settle wait (bounded by the stop timeout), and no SIGTERM.
    engine = StoppingEngine(stop_timeout=0.3)
    assert await asyncio.wait_for(EngineManager().stop(engine.instance), 5) == -9  # type: ignore[arg-type]
    assert engine.stopped_with == [0]
    assert engine.saved == ["tiny@2048"] and engine.forgotten == 1
    assert engine.save_budgets == [SETTLE_WAIT]  # saves wait behind the decoding batch: bounded
    assert "tiny@2048 pid 1 port 2 still decodes a request whose client is gone: SIGKILL" in caplog.text


async def test_an_engine_whose_slots_do_not_answer_is_killed_at_once_unsaved(caplog) -> None:
    engine = StoppingEngine(stop_timeout=0.3, silent=True)  # frozen
    assert await asyncio.wait_for(EngineManager().stop(engine.instance), 5) == -9  # type: ignore[arg-type]
    assert engine.stopped_with == [0]
    assert engine.saved == [] and engine.forgotten == 1
    assert "tiny@2048 pid 1 port 2 does not answer /slots: SIGKILL" in caplog.text


async def test_an_engine_that_cannot_show_its_slots_is_sent_sigterm_at_once() -> None:
    engine = StoppingEngine(slots_answer=False)  # llama-server --no-slots
    assert await asyncio.wait_for(EngineManager().stop(engine.instance), 5) == 0  # type: ignore[arg-type]
    assert engine.stopped_with == [5.0]
