"""A fault inside the supervisor ends only the requests it concerns (#10, item 6).

`-np two` once passed the config check and made the queue policy raise on every event,
which left every queued request of every model waiting forever. Now a request whose
planning raises gets a 500 naming the cause, the traceback is logged once, and the
supervisor goes on serving the rest. The fault is injected into the policy's inputs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import pytest

from gateway.config.schema import Model, Variant
from gateway.errors import ContextLengthExceeded, GatewayError
from gateway.models import Room
from gateway.supervisor import supervisor as supervisor_module
from gateway.supervisor.requests import Grant
from gateway.supervisor.supervisor import Supervisor
from tests.test_supervisor import LONG, FakeEffects, FakeInstance, ask, handled, make_config, state_of, until


class BrokenCapacity(FakeEffects):
    """Effects whose capacity of model `a` raises, as `int("two")` did for `-np two`."""

    def capacity(self, variant: Variant, model: Model) -> Room:
        if model.name == "a":
            return Room(int("two"))
        return super().capacity(variant, model)


@pytest.fixture
async def broken() -> AsyncIterator[tuple[Supervisor, BrokenCapacity]]:
    effects = BrokenCapacity()
    async with supervising(effects) as sup:
        yield sup, effects


@contextlib.asynccontextmanager
async def supervising(effects: FakeEffects, drain: float = LONG) -> AsyncIterator[Supervisor]:
    """A running supervisor over `effects`; it must still run when the test ends."""
    sup = Supervisor(make_config(drain=drain), effects)
    sup.start()
    try:
        yield sup
        assert sup._task is not None and not sup._task.done(), "the supervisor must keep running"
    finally:
        for call in effects.starts:
            if not call.future.done():
                call.future.cancel()
        assert sup._task is not None
        sup._task.cancel()
        await asyncio.gather(sup._task, return_exceptions=True)


async def test_a_request_the_policy_raises_for_gets_a_500_and_others_are_served(
    broken: tuple[Supervisor, BrokenCapacity], caplog: pytest.LogCaptureFixture
) -> None:
    sup, effects = broken
    caplog.set_level(logging.ERROR, "gateway.supervisor")
    _, bad = ask(sup, "a")
    _, good = ask(sup, "b")
    _, bad_again = ask(sup, "a")
    await until(lambda: bad.done() and bad_again.done())
    for task in (bad, bad_again):
        error = task.exception()
        assert isinstance(error, GatewayError) and error.status == 500
        assert "invalid literal for int()" in error.message and "'two'" in error.message
    await until(lambda: len(effects.starts) == 1)
    assert effects.starts[0].variant.key == "b@4096"
    effects.starts[0].succeed()
    await until(good.done)
    assert good.result().instance.variant.key == "b@4096"
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert len(tracebacks) == 1, "the traceback of one cause is logged once"
    assert sup.counters["supervisor_faults"] >= 2


async def test_an_event_that_raises_answers_its_request_and_the_loop_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    effects = FakeEffects()
    async with supervising(effects) as sup:
        arrive = sup._arrive

        def arrive_or_raise(pending):  # type: ignore[no-untyped-def]
            if pending.reserve == 13:
                raise KeyError("injected")
            arrive(pending)

        monkeypatch.setattr(sup, "_arrive", arrive_or_raise)
        _, doomed = ask(sup, "b", reserve=13)
        _, fine = ask(sup, "b")
        await until(doomed.done)
        error = doomed.exception()
        assert isinstance(error, GatewayError) and error.status == 500 and "injected" in error.message
        await until(lambda: len(effects.starts) == 1)
        effects.starts[0].succeed()
        await until(fine.done)
        assert fine.result().instance.variant.key == "b@4096"


async def test_a_frozen_engine_is_killed_marked_crashed_and_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(supervisor_module, "PROBE_INTERVAL", 0.01)
    effects = FakeEffects()
    async with supervising(effects) as sup:
        _, first = ask(sup, "b")
        await until(lambda: len(effects.starts) == 1)
        engine = effects.starts[0].succeed()
        await until(first.done)
        await until(lambda: len(effects.probes) >= 2)  # probed while a request is in flight
        assert state_of(sup) == "ready"
        engine.frozen = "no answer to /health within 5s"
        await until(lambda: state_of(sup) == "crashed")
        assert engine.process.killed
        assert sup.history[-1].trigger == "died"
        assert "frozen" in sup.history[-1].reason
        _, second = ask(sup, "b")  # a new request gets a new engine, not the frozen one
        await until(lambda: len(effects.starts) == 2)
        effects.starts[1].succeed()
        await until(second.done)
        assert second.result().instance is not engine


async def test_an_engine_with_nothing_in_flight_is_not_probed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor_module, "PROBE_INTERVAL", 0.01)
    effects = FakeEffects()
    async with supervising(effects) as sup:
        _, first = ask(sup, "b")
        await until(lambda: len(effects.starts) == 1)
        effects.starts[0].succeed()
        await until(first.done)
        sup.release(first.result())
        await until(lambda: not sup.scheduler.leases)
        probes = len(effects.probes)
        await asyncio.sleep(0.1)  # ten probe intervals: none may come with nothing in flight
        assert len(effects.probes) <= probes + 1


async def test_a_variant_that_fails_to_start_fails_only_its_own_waiters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(supervisor_module, "BACKOFF_BASE", 30.0)  # a back-off no test waits out
    effects = FakeEffects()
    async with supervising(effects) as sup:
        _, big = ask(sup, "a", tokens=5000)  # needs a@8192
        await until(lambda: len(effects.starts) == 1)
        _, small = ask(sup, "a", tokens=100)  # a@512 serves it
        effects.starts[0].fail("exited", "K cache type q8_0 ... does not divide n_embd_head_k")
        await until(big.done)
        error = big.exception()
        assert isinstance(error, GatewayError) and error.status == 502
        # The small request is not failed with it and starts its own variant at once.
        await until(lambda: len(effects.starts) == 2)
        assert effects.starts[1].variant.key == "a@512" and not small.done()
        effects.starts[1].succeed()
        await until(small.done)
        assert small.result().instance.variant.key == "a@512"


async def test_a_variant_backing_off_does_not_hold_up_the_queue_behind_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(supervisor_module, "BACKOFF_BASE", 30.0)
    effects = FakeEffects()
    async with supervising(effects) as sup:
        _, big = ask(sup, "a", tokens=5000)
        await until(lambda: len(effects.starts) == 1)
        effects.starts[0].fail("exited", "boom")
        await until(big.done)
        # a@8192 backs off for 30 s; a request needing it is now the head of the queue.
        _, big_again = ask(sup, "a", tokens=5000)
        _, small = ask(sup, "b", tokens=100)
        await until(lambda: len(effects.starts) == 2)
        assert effects.starts[1].variant.key == "b@4096"
        effects.starts[1].succeed()
        await until(small.done)
        assert not big_again.done() and sup._retry_at["a@8192"] > time.monotonic()


async def test_a_prompt_too_large_by_its_lower_bound_is_rejected_without_a_swap() -> None:
    effects = FakeEffects()
    effects.longest = {"a": 4, "b": 4}
    async with supervising(effects) as sup:
        _, running = ask(sup, "b")
        await until(lambda: len(effects.starts) == 1)
        effects.starts[0].succeed()
        await until(running.done)
        # 1 MB for model a, whose largest context is 8192: at least 262144 tokens.
        _, huge = ask(sup, "a", tokens=None, text_bytes=1 << 20)
        await until(huge.done)
        error = huge.exception()
        assert isinstance(error, ContextLengthExceeded)
        assert "at least 262" in error.message and "8192" in error.message
        assert len(effects.starts) == 1 and state_of(sup) == "ready"  # b keeps running
        # A large prompt that the bound cannot rule out is still counted on an engine.
        _, maybe = ask(sup, "a", tokens=None, text_bytes=30_000)
        await until(lambda: state_of(sup) == "draining" or len(effects.starts) == 2)
        assert not maybe.done()


async def test_an_abandoned_request_keeps_its_room_until_the_engine_lets_it_go() -> None:
    effects = FakeEffects()
    async with supervising(effects) as sup:
        _, first = ask(sup, "a", tokens=400, reserve=50)
        await until(lambda: len(effects.starts) == 1)
        effects.starts[0].succeed(kv_budget=512)
        await until(first.done)
        effects.busy = frozenset({7})  # the engine still runs task 7: perhaps the abandoned one
        sup.release(first.result(), abandoned=True)
        _, second = ask(sup, "a", tokens=300, reserve=50)
        await until(lambda: effects.looks >= 3)
        assert not second.done(), "granted while the abandoned request may still fill the cache"
        effects.busy = frozenset({8})  # task 7 is over; 8 came after the abandonment
        await until(second.done)
        assert second.result().instance.variant.key == "a@512"


async def test_a_request_that_ended_normally_frees_its_room_at_once() -> None:
    effects = FakeEffects()
    async with supervising(effects) as sup:
        _, first = ask(sup, "a", tokens=400, reserve=50)
        await until(lambda: len(effects.starts) == 1)
        effects.starts[0].succeed(kv_budget=512)
        await until(first.done)
        effects.busy = frozenset({7})
        sup.release(first.result(), served=True)
        _, second = ask(sup, "a", tokens=300, reserve=50)
        await until(second.done)
        assert effects.looks == 0


async def test_a_unified_engine_gets_no_more_sequences_than_it_has_slots() -> None:
    effects = FakeEffects()
    async with supervising(effects) as sup:
        _, first = ask(sup, "a", tokens=10, reserve=10)
        await until(lambda: len(effects.starts) == 1)
        engine = effects.starts[0].succeed(kv_budget=8192)
        engine.slots = 2
        await until(first.done)
        _, second = ask(sup, "a", tokens=10, reserve=10)
        _, third = ask(sup, "a", tokens=10, reserve=10)
        await until(second.done)
        assert not third.done(), "a third sequence would wait inside the engine, unseen"
        sup.release(first.result(), served=True)
        await until(third.done)


async def test_a_swap_stops_the_engine_only_once_it_let_go_of_abandoned_requests() -> None:
    # llama-server ignores SIGTERM while it still runs a request: stopping it while it
    # finishes an abandoned one would cost the whole stop_timeout.
    effects = FakeEffects()
    async with supervising(effects) as sup:
        first = await granted_on_a_shared_cache(sup, effects)
        effects.busy = frozenset({7})
        sup.release(first, abandoned=True)
        ask(sup, "b")  # needs a swap
        await until(lambda: state_of(sup) == "draining" and effects.looks >= 3)
        assert not effects.stops
        effects.busy = frozenset()
        await until(lambda: len(effects.stops) == 1)


class HangingLook(FakeEffects):
    """An engine whose /slots answers only once the look is given up: it records
    whether a look was still waiting when the engine was told to stop (llama-server
    then never exits: the look's handler waits on its stopped task loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.looking = 0  # looks waiting for their answer now
        self.looking_at_stop: list[int] = []

    async def busy_tasks(self, instance):  # type: ignore[no-untyped-def]
        self.looks += 1
        self.looking += 1
        try:
            await asyncio.Event().wait()
        finally:
            self.looking -= 1
        raise AssertionError("unreachable")

    async def stop(self, instance: FakeInstance) -> int:
        self.looking_at_stop.append(self.looking)
        return await super().stop(instance)


async def granted_on_a_shared_cache(sup: Supervisor, effects: FakeEffects) -> Grant:
    """A request granted on a fresh engine of `a` whose slots share one KV cache (the
    requests a client leaves on it become ghosts)."""
    _, first = ask(sup, "a", tokens=100)
    await until(lambda: len(effects.starts) == 1)
    effects.starts[0].succeed(kv_budget=512)
    await until(first.done)
    return first.result()


async def test_no_look_at_the_slots_is_under_way_when_an_engine_is_stopped() -> None:
    effects = HangingLook()
    async with supervising(effects, drain=0.05) as sup:
        sup.release(await granted_on_a_shared_cache(sup, effects), abandoned=True)  # its look hangs
        await until(lambda: effects.looking == 1)
        ask(sup, "b")  # a swap: the drain times out on the abandoned request, then the stop
        await until(lambda: len(effects.stops) == 1)
        assert effects.looking_at_stop == [0]


class HeldStop(FakeEffects):
    """A stop that takes until `let_go` (saves, SIGTERM's wait)."""

    def __init__(self) -> None:
        super().__init__()
        self.let_go = asyncio.Event()

    async def stop(self, instance: FakeInstance) -> int:
        self.stops.append(instance)
        await self.let_go.wait()
        return await super().stop(instance)


async def test_a_request_released_while_its_engine_stops_starts_no_look_at_the_slots() -> None:
    # The requests a drain timeout cut off are released after the stop began: a look at
    # /slots then would race the SIGTERM (and keep llama-server from exiting).
    effects = HeldStop()
    async with supervising(effects, drain=0.05) as sup:
        first = await granted_on_a_shared_cache(sup, effects)
        effects.busy = frozenset({7})
        ask(sup, "b")  # a swap: the drain times out with `first` in flight, then the stop
        await until(lambda: len(effects.stops) == 1)
        sup.release(first, abandoned=True)
        await handled(sup)
        assert effects.looks == 0
        effects.let_go.set()
        await until(lambda: state_of(sup) in ("starting", "ready"))


async def test_an_engine_that_freezes_after_a_client_left_is_still_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Nothing in flight, only an abandoned request: its look at /slots never comes back
    # from a frozen engine, so the probe must run for it too.
    monkeypatch.setattr(supervisor_module, "PROBE_INTERVAL", 0.01)
    effects = FrozenSlots()
    async with supervising(effects) as sup:
        _, first = ask(sup, "a", tokens=100)
        await until(lambda: len(effects.starts) == 1)
        engine = effects.starts[0].succeed(kv_budget=512)
        await until(first.done)
        engine.frozen = "no answer to /health within 5s"
        sup.release(first.result(), abandoned=True)
        await until(lambda: state_of(sup) == "crashed")
        assert engine.process.killed


class FrozenSlots(FakeEffects):
    """An engine whose /slots never answers."""

    async def busy_tasks(self, instance):  # type: ignore[no-untyped-def]
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_request_of_unknown_size_runs_alone_on_a_shared_cache() -> None:
    # /v1/messages and /v1/responses bodies go through the engine's template, which may add
    # any amount: such a request waits for an idle engine and holds it alone.
    effects = FakeEffects()
    async with supervising(effects) as sup:
        _, first = ask(sup, "a", tokens=10, reserve=10)
        await until(lambda: len(effects.starts) == 1)
        effects.starts[0].succeed(kv_budget=8192)
        await until(first.done)
        unknown, alone = ask(sup, "a", tokens=100, reserve=10)
        unknown.method = "unbounded"
        _, after = ask(sup, "a", tokens=10, reserve=10)
        await handled(sup, alone, after)
        assert not alone.done() and not after.done()  # it waits its turn, and so do later ones
        sup.release(first.result(), served=True)
        await until(alone.done)
        await handled(sup, after)
        assert not after.done()
        sup.release(alone.result(), served=True)
        await until(after.done)


async def test_a_fault_no_single_request_explains_answers_all_waiters_and_the_loop_lives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    effects = FakeEffects()
    async with supervising(effects) as sup:

        def broken_view():  # type: ignore[no-untyped-def]
            raise RuntimeError("injected into the engine's view")

        monkeypatch.setattr(sup, "_views", broken_view)
        _, waiter = ask(sup, "b")
        await until(waiter.done)
        error = waiter.exception()
        assert isinstance(error, GatewayError) and error.status == 500 and "injected" in error.message
        monkeypatch.undo()
        _, later = ask(sup, "b")  # the supervisor still serves
        await until(lambda: len(effects.starts) == 1)
        effects.starts[0].succeed()
        await until(later.done)
