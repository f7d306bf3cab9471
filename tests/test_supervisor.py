"""The Supervisor driven by events, with fake effects: no processes, no sockets.

The fake `start()` hands the test a `StartCall` whose future the test completes (or
fails); a fake engine's `exited` future is completed to simulate a crash.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from gateway.config.schema import (
    EngineKind,
    GatewayConfig,
    Model,
    RequestRules,
    ServerConfig,
    Timeouts,
    Variant,
)
from gateway.engine.adapter import StartFailed
from gateway.errors import ContextLengthExceeded, EngineFailed, EngineTimeout, Unavailable
from gateway.models import PromptShape, Room, byte_bound
from gateway.supervisor import supervisor as supervisor_module
from gateway.supervisor.requests import Grant, PendingRequest
from gateway.supervisor.slot import Starting
from gateway.supervisor.supervisor import Supervisor

LONG = 30.0  # a timeout no test waits for: the behaviour must not depend on it
TICK = 0.05  # the tiny timeouts the tests do wait for

# --- config -----------------------------------------------------------------------------


def make_config(
    *,
    drain: float = LONG,
    idle: float = 0.0,
    queue_limit: int = 16,
    max_start_failures: int = 3,
) -> GatewayConfig:
    timeouts = Timeouts(health_check=TICK, startup=TICK, drain=drain, stop=TICK, idle=idle)

    def model(name: str, *contexts: int) -> Model:
        variants = tuple(Variant(name, c, (), None, timeouts) for c in contexts)
        return Model(name, (), EngineKind.LLAMA_CPP, None, (), {}, 128, RequestRules(), variants)

    server = ServerConfig(
        listen=(("127.0.0.1", 0),),
        queue_limit=queue_limit,
        max_body_bytes=1 << 20,
        max_start_failures=max_start_failures,
        loading_keepalive=False,
        timeouts=timeouts,
    )
    return GatewayConfig("test.lua", server, (model("a", 512, 2048, 8192), model("b", 4096)))


# --- fakes ------------------------------------------------------------------------------

_pids = itertools.count(1000)


class FakeProcess:
    def __init__(self) -> None:
        self.pid = next(_pids)
        self.started_monotonic = time.monotonic()
        self.killed = False

    def last_lines(self) -> list[str]:
        return [f"engine {self.pid}: last words"]

    def kill_now(self) -> None:
        self.killed = True


@dataclass(eq=False)
class FakeInstance:
    model: Model
    variant: Variant
    process: FakeProcess
    port: int
    slot_context: int
    exited: asyncio.Future[int]
    served_name: str = "fake"
    kv_budget: int | None = None
    overhead: None = None
    startup_seconds: float = 0.01
    slots: int = 4  # llama-server's automatic count
    frozen: str | None = None  # what a health probe reports

    @property
    def room(self) -> Room:
        return Room(self.slot_context, self.kv_budget, self.slots)

    @property
    def slot_cap(self) -> int | None:
        return self.slots if self.kv_budget is not None else None  # as llama.cpp's

    @property
    def where(self) -> str:
        return f"pid {self.process.pid} port {self.port}"

    def crash(self, code: int = -11) -> None:
        self.exited.set_result(code)

    cut_off_reason: str | None = None

    def cut_off(self, reason: str) -> None:
        self.cut_off_reason = reason

    def upper_bound(self, kind: str, shape: PromptShape) -> int | None:
        return byte_bound(kind, shape, None)  # no chat template measured


@dataclass(eq=False)
class StartCall:
    model: Model
    variant: Variant
    future: asyncio.Future[FakeInstance] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    cancelled: bool = False
    cancels: int = 0  # how many times the start effect was cancelled
    killed: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )  # (SlowKill) its engine is gone once cut short

    def succeed(self, slot_context: int | None = None, kv_budget: int | None = None) -> FakeInstance:
        loop = asyncio.get_running_loop()
        instance = FakeInstance(
            model=self.model,
            variant=self.variant,
            process=FakeProcess(),
            port=40000 + len(self.variant.key),
            slot_context=slot_context or self.variant.context,
            exited=loop.create_future(),
            kv_budget=kv_budget,
        )
        self.future.set_result(instance)
        return instance

    def fail(self, kind: str = "exited", message: str = "boom") -> None:
        self.future.set_exception(StartFailed(kind, message, ["line 1", "line 2"]))


class FakeEffects:
    def __init__(self, capacity: Callable[[Variant], int] = lambda v: v.context) -> None:
        self._capacity_of = capacity
        self.starts: list[StartCall] = []
        self.stops: list[FakeInstance] = []
        self.probes: list[FakeInstance] = []
        self.longest: dict[str, int] = {}  # model -> its vocabulary's longest token
        self.memory: dict[str, int] = {}  # variant key -> its estimated footprint
        self.measured: dict[str, int] = {}  # variant key -> what its engine measures
        self.busy: frozenset[int] = frozenset()  # the engine's busy tasks, as /slots shows them
        self.looks = 0
        self.clears: list[FakeInstance] = []  # engines told to erase their idle slots

    def capacity(self, variant: Variant, model: Model) -> Room:
        return Room(self._capacity_of(variant))

    def longest_token(self, variant: Variant) -> int | None:
        return self.longest.get(variant.model)

    def footprint(self, variant: Variant) -> int | None:
        return self.memory.get(variant.key)

    def cached_prompts(self) -> dict[str, list[dict[str, Any]]]:
        return {}

    def measure(self, instance: FakeInstance) -> int | None:
        return self.measured.get(instance.variant.key)

    async def busy_tasks(self, instance: FakeInstance) -> frozenset[int]:
        self.looks += 1
        return self.busy

    async def start(self, model: Model, variant: Variant) -> FakeInstance:
        call = StartCall(model, variant)
        self.starts.append(call)
        try:
            return await call.future
        except asyncio.CancelledError:
            call.cancelled = True
            call.cancels += 1
            raise

    async def stop(self, instance: FakeInstance) -> int:
        self.stops.append(instance)
        if not instance.exited.done():
            instance.exited.set_result(0)  # like a real engine: it exits, then stop returns
        await asyncio.sleep(0)
        return 0

    async def clear_idle_slots(self, instance: FakeInstance) -> None:
        self.clears.append(instance)

    async def probe(self, instance: FakeInstance) -> str | None:
        self.probes.append(instance)
        return instance.frozen

    @property
    def started_keys(self) -> list[str]:
        return [call.variant.key for call in self.starts]


# --- helpers ----------------------------------------------------------------------------
#
# The tests never count event-loop turns: they wait for the state they then assert
# (`until`), or for the supervisor to have handled what was posted to it (`handled`).


async def until(condition: Callable[[], object], timeout: float = 2.0) -> None:
    """Yield to the event loop until `condition()` holds; fail, naming it, after `timeout`."""
    deadline = time.monotonic() + timeout
    turns = 0
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not reached within {timeout:g}s: {_source(condition)}")
        turns += 1
        await asyncio.sleep(0 if turns < 100 else 0.001)


def _source(condition: Callable[[], object]) -> str:
    try:
        return inspect.getsource(condition).strip()
    except (OSError, TypeError):
        return repr(condition)


_asked: weakref.WeakKeyDictionary[asyncio.Task[Grant], PendingRequest] = weakref.WeakKeyDictionary()


def _arrival_posted(task: asyncio.Task[Grant]) -> bool:
    """The request's `acquire` has posted its arrival to the supervisor; once the task is
    cancelled, its cancellation (it has ended)."""
    if task.done():
        return True
    pending = _asked[task]
    return not task.cancelling() and pending.future is not None and not pending.future.done()


async def handled(sup: Supervisor, *tasks: asyncio.Task[Grant]) -> None:
    """Until the supervisor has handled every event posted so far, the arrivals (or
    cancellations) of `tasks` included. (It takes an event from its inbox and handles it
    in the same step, so an empty inbox means all are handled.) What an effect posts later
    (a start's or a stop's result, an exit, a timer) is not waited for: wait for its state."""
    await until(lambda: all(_arrival_posted(t) for t in tasks))
    await sup.quiesce()
    # ... and the tasks it answered have woken up with their answer
    await until(lambda: all(t.done() for t in tasks if _answered(t)))


def _answered(task: asyncio.Task[Grant]) -> bool:
    future = _asked[task].future
    return future is not None and future.done()


_request_ids = itertools.count(1)


def pending_for(
    sup: Supervisor, model: str, tokens: int | None = 100, reserve: int = 100, text_bytes: int = 400
) -> PendingRequest:
    resolved = sup.config.resolve(model)
    assert resolved is not None
    pending = PendingRequest(
        request_id=f"r{next(_request_ids)}",
        model=resolved,
        kind="chat",
        shape=PromptShape(text_bytes=text_bytes, messages=1),
        reserve=reserve,
    )
    if tokens is not None:
        pending.exact_tokens, pending.method = tokens, "exact"
    return pending


def acquire(sup: Supervisor, pending: PendingRequest) -> asyncio.Task[Grant]:
    task = asyncio.ensure_future(sup.acquire(pending))
    _asked[task] = pending
    return task


def ask(sup: Supervisor, model: str, **kwargs) -> tuple[PendingRequest, asyncio.Task[Grant]]:
    pending = pending_for(sup, model, **kwargs)
    return pending, acquire(sup, pending)


def state_of(sup: Supervisor) -> str:
    """The state of the engine that took the last transition (these tests run one
    engine at a time), idle before any."""
    return sup.history[-1].dest if sup.history else "idle"


def engine_of(sup: Supervisor) -> dict[str, Any]:
    """The one engine /gateway/state shows (these tests run one at a time), or an idle one."""
    engines = [e for e in sup.snapshot()["engines"] if e["state"] != "crashed" or e["pid"]]
    assert len(engines) <= 1, engines
    idle = {"state": "idle", "pid": None, "variant": None, "engine_log": sup.last_engine_lines}
    return engines[0] if engines else idle


def transitions(sup: Supervisor) -> list[str]:
    return [f"{r.source}->{r.dest}" for r in sup.history]


def triggers(sup: Supervisor) -> list[str]:
    return [r.trigger for r in sup.history]


def states(sup: Supervisor) -> list[str]:
    history = list(sup.history)
    return [history[0].source, *(r.dest for r in history)] if history else ["idle"]


SWAP = ["ready", "draining", "stopping", "idle", "starting", "ready"]


def assert_every_swap_drains_and_stops(sup: Supervisor) -> None:
    """Between two starts the engine either crashed or was drained and then stopped."""
    seen = states(sup)
    starts = [i for i, state in enumerate(seen) if state == "starting"]
    for before, after in itertools.pairwise(starts):
        between = seen[before + 1 : after]
        if "ready" in between and "crashed" not in between:
            assert between[-4:] == ["ready", "draining", "stopping", "idle"], seen


@dataclass
class Harness:
    sup: Supervisor
    fx: FakeEffects

    async def ready(self, model: str = "a", tokens: int = 100) -> tuple[FakeInstance, Grant]:
        """Start an engine for one request and return the engine and that request's grant."""
        started = len(self.fx.starts)
        _, task = ask(self.sup, model, tokens=tokens)
        await until(lambda: len(self.fx.starts) > started)
        instance = self.fx.starts[-1].succeed()
        await until(task.done)
        return instance, task.result()


@pytest.fixture(autouse=True)
def no_supervisor_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """An exception while handling an event is always a bug: the supervisor only logs it."""
    yield
    errors = [
        r.getMessage()
        for r in (*caplog.get_records("setup"), *caplog.get_records("call"))
        if r.name == "gateway.supervisor" and r.getMessage().startswith("supervisor fault")
    ]
    assert errors == []


@pytest.fixture
def config() -> GatewayConfig:
    return make_config()


@pytest.fixture
async def harness(config: GatewayConfig) -> AsyncIterator[Harness]:
    fx = FakeEffects()
    sup = Supervisor(config, fx)
    sup.start()
    yield Harness(sup, fx)
    assert sup._task is not None
    if sup._shutdown is None:
        assert not sup._task.done(), "the supervisor task must never end on its own"
    for slot in sup.slots.values():
        for timer in list(slot.timers):
            slot.cancel(timer)
    for call in fx.starts:
        if not call.future.done():
            call.future.cancel()
    sup._task.cancel()
    await asyncio.gather(sup._task, return_exceptions=True)


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(supervisor_module, "BACKOFF_BASE", 0.02)
    return 0.02


# --- tests ------------------------------------------------------------------------------


async def test_first_request_starts_smallest_fitting_variant(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    _, task = ask(sup, "a", tokens=600, reserve=100)
    await until(lambda: len(fx.starts) == 1)
    assert fx.started_keys == ["a@2048"]
    assert state_of(sup) == "starting"
    assert not task.done()
    assert engine_of(sup)["variant"] == {"context": 2048, "key": "a@2048"}

    instance = fx.starts[0].succeed()
    await until(task.done)
    grant = task.result()
    assert grant.instance is instance
    assert grant.selection.variant is not None and grant.selection.variant.context == 2048
    assert not grant.count_first
    assert states(sup) == ["idle", "starting", "ready"]
    assert sup.snapshot()["in_flight"] == 1


async def test_queued_requests_for_the_starting_engine_are_all_granted(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    tasks = [ask(sup, "a", tokens=100 * (i + 1))[1] for i in range(4)]
    await handled(sup, *tasks)
    await until(lambda: len(fx.starts) == 1)
    assert fx.started_keys == ["a@512"]
    assert not any(t.done() for t in tasks)
    assert sup.snapshot()["queued"] == {"count": 4, "models": {"a": 4}}

    instance = fx.starts[0].succeed()
    await until(lambda: all(t.done() for t in tasks))
    grants = [t.result() for t in tasks]
    assert all(g.instance is instance for g in grants)
    assert len({g.lease for g in grants}) == 4
    assert fx.started_keys == ["a@512"]
    assert sup.snapshot()["in_flight"] == 4
    assert sup.snapshot()["queued"]["count"] == 0


async def test_swap_waits_for_the_lease_then_drains_and_stops(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    a_engine, a_grant = await harness.ready("a")
    _, b_task = ask(sup, "b")
    await handled(sup, b_task)
    assert state_of(sup) == "draining"
    assert not b_task.done()
    assert fx.stops == [] and fx.started_keys == ["a@512"]

    sup.release(a_grant, served=True)
    await until(lambda: len(fx.starts) == 2)
    assert fx.stops == [a_engine]
    assert state_of(sup) == "starting"
    assert fx.started_keys == ["a@512", "b@4096"]

    b_engine = fx.starts[1].succeed()
    await until(b_task.done)
    assert b_task.result().instance is b_engine
    assert states(sup) == ["idle", "starting", *SWAP]
    assert_every_swap_drains_and_stops(sup)


async def test_swap_with_nothing_in_flight_does_not_wait_for_drain_timeout(
    harness: Harness,
) -> None:
    sup, fx = harness.sup, harness.fx
    a_engine, a_grant = await harness.ready("a")
    sup.release(a_grant, served=True)
    await handled(sup)
    assert state_of(sup) == "ready"
    assert sup.snapshot()["in_flight"] == 0

    _, b_task = ask(sup, "b")
    await handled(sup, b_task)
    # The drain timeout is LONG: nothing in flight means drained and stopping at once.
    assert state_of(sup) == "stopping"
    await until(lambda: len(fx.starts) == 2)
    assert fx.stops == [a_engine]
    assert fx.started_keys == ["a@512", "b@4096"]
    fx.starts[1].succeed()
    await until(b_task.done)
    assert states(sup) == ["idle", "starting", *SWAP]


async def test_abab_arrivals_during_a_start_cause_one_swap(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    order = ["a", "b", "a", "b"]
    tasks = [ask(sup, m)[1] for m in order]
    await handled(sup, *tasks)
    await until(lambda: len(fx.starts) == 1)
    assert fx.started_keys == ["a@512"]

    a_engine = fx.starts[0].succeed()
    await until(lambda: tasks[0].done() and tasks[2].done())
    assert not tasks[1].done() and not tasks[3].done()
    assert state_of(sup) == "draining"  # b is next; the two a's are in flight

    sup.release(tasks[0].result(), served=True)
    await handled(sup)
    assert state_of(sup) == "draining"
    assert sup.snapshot()["in_flight"] == 1
    sup.release(tasks[2].result(), served=True)
    await until(lambda: len(fx.starts) == 2)
    assert fx.stops == [a_engine]
    b_engine = fx.starts[1].succeed()
    await until(lambda: tasks[1].done() and tasks[3].done())
    assert tasks[1].result().instance is b_engine
    assert tasks[3].result().instance is b_engine
    for task in (tasks[1], tasks[3]):
        sup.release(task.result(), served=True)
    await handled(sup)
    assert fx.started_keys == ["a@512", "b@4096"]
    assert state_of(sup) == "ready"
    assert sup.snapshot()["in_flight"] == 0
    assert sup.counters["starts"] == 2


async def test_arrivals_during_a_drain_wait_for_the_head_of_the_queue(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    _, a_grant = await harness.ready("a")
    b1 = ask(sup, "b")[1]
    await handled(sup, b1)
    a2 = ask(sup, "a")[1]  # a still runs, but b came first: a2 must not jump ahead
    b2 = ask(sup, "b")[1]
    await handled(sup, a2, b2)
    assert state_of(sup) == "draining"
    assert not a2.done()

    sup.release(a_grant, served=True)
    await until(lambda: len(fx.starts) == 2)
    fx.starts[1].succeed()
    await until(lambda: b1.done() and b2.done())
    assert not a2.done()
    assert state_of(sup) == "draining"  # now a2 is the head
    for task in (b1, b2):
        sup.release(task.result(), served=True)
    await until(lambda: len(fx.starts) == 3)
    fx.starts[2].succeed()
    await until(a2.done)
    assert fx.started_keys == ["a@512", "b@4096", "a@512"]
    assert_every_swap_drains_and_stops(sup)


@pytest.mark.parametrize("config", [make_config(drain=4 * TICK)])
async def test_drain_timeout_cuts_off_a_leasestuck(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    a_engine, stuck = await harness.ready("a")
    _, b_task = ask(sup, "b")
    await handled(sup, b_task)
    assert state_of(sup) == "draining"
    assert fx.stops == []

    await until(lambda: len(fx.starts) == 2)
    assert state_of(sup) == "starting"
    assert a_engine.cut_off_reason  # its answers in flight are ended, not awaited
    assert fx.stops == [a_engine]
    drained = [r for r in sup.history if r.trigger == "drained"]
    assert len(drained) == 1 and "drain_timeout" in drained[0].reason
    fx.starts[1].succeed()
    await until(b_task.done)
    # The late release of the cut-off lease is harmless.
    sup.release(stuck)
    await handled(sup)
    assert state_of(sup) == "ready"
    assert sup.snapshot()["in_flight"] == 1


async def test_crash_moves_ready_to_crashed_and_next_request_restarts_after_backoff(
    harness: Harness, fast_backoff: float
) -> None:
    sup, fx = harness.sup, harness.fx
    a_engine, a_grant = await harness.ready("a")
    a_engine.crash(-9)
    await until(lambda: state_of(sup) == "crashed")
    assert transitions(sup)[-1] == "ready->crashed"
    assert sup.counters["crashes"] == 1
    assert engine_of(sup)["engine_log"] == a_engine.process.last_lines()

    _, task = ask(sup, "a")
    await handled(sup, task)
    assert state_of(sup) == "crashed"  # backing off: not at once
    await until(lambda: len(fx.starts) == 2)
    died, start = [r for r in sup.history if r.trigger in ("died", "start")][-2:]
    assert (died.trigger, start.trigger) == ("died", "start")
    assert start.monotonic - died.monotonic >= fast_backoff
    fx.starts[1].succeed()
    await until(task.done)
    assert states(sup)[-3:] == ["crashed", "starting", "ready"]
    sup.release(a_grant)  # the dead engine's lease ends late: no effect
    await handled(sup)
    assert state_of(sup) == "ready"
    assert sup.snapshot()["in_flight"] == 1


async def test_crash_of_a_draining_engine_still_serves_the_swap_target(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    a_engine, _ = await harness.ready("a")
    _, b_task = ask(sup, "b")
    await handled(sup, b_task)
    assert state_of(sup) == "draining"
    a_engine.crash()
    await until(lambda: "draining->crashed" in transitions(sup))
    assert state_of(sup) == "starting"  # b is another model: no backoff for it
    await until(lambda: len(fx.starts) == 2)
    fx.starts[1].succeed()
    await until(b_task.done)
    assert fx.stops == []  # a crashed engine is not stopped again


@pytest.mark.parametrize("config", [make_config(max_start_failures=2)])
async def test_start_failures_fail_the_waiters_and_reset_after_the_limit(
    harness: Harness, fast_backoff: float
) -> None:
    sup, fx = harness.sup, harness.fx
    tasks = [ask(sup, "a")[1] for _ in range(2)]
    _, b_task = ask(sup, "b")
    await handled(sup, *tasks, b_task)
    await until(lambda: len(fx.starts) == 1)
    fx.starts[0].fail("exited", "exited with 1 while starting")
    await until(lambda: all(t.done() for t in tasks))
    for task in tasks:
        with pytest.raises(EngineFailed) as info:
            task.result()
        assert "line 2" in info.value.message
    assert state_of(sup) in ("crashed", "starting")
    assert transitions(sup)[:2] == ["idle->starting", "starting->crashed"]
    # The other model's waiter is not failed with a's error: it gets its own start.
    assert not b_task.done()
    await until(lambda: len(fx.starts) == 2)
    assert fx.started_keys == ["a@512", "b@4096"]
    fx.starts[1].succeed()
    await until(b_task.done)
    sup.release(b_task.result(), served=True)
    await handled(sup)

    _, again = ask(sup, "a")
    await until(lambda: len(fx.starts) == 3)
    fx.starts[2].fail("timeout", "not healthy in time")
    await until(again.done)
    with pytest.raises(EngineTimeout):
        again.result()
    assert sup.counters["start_failures"] == 2
    assert transitions(sup)[-2:] == ["starting->crashed", "crashed->idle"]
    assert sup.history[-1].trigger == "reset"
    assert state_of(sup) == "idle"


async def test_spawn_failure_is_unavailable(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    _, task = ask(sup, "a")
    await until(lambda: len(fx.starts) == 1)
    fx.starts[0].fail("spawn", "no llama-server")
    await until(task.done)
    with pytest.raises(Unavailable):
        task.result()
    assert state_of(sup) == "crashed"


@pytest.mark.parametrize("config", [make_config(queue_limit=2)])
async def test_queue_limit_gives_unavailable_with_retry_after(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    first = [ask(sup, "a")[1] for _ in range(2)]
    _, third = ask(sup, "a")
    await handled(sup, *first, third)
    assert third.done()
    with pytest.raises(Unavailable) as info:
        third.result()
    assert info.value.headers.get("Retry-After")
    assert info.value.status == 503
    assert sup.counters["rejected_queue_full"] == 1
    await until(lambda: len(fx.starts) == 1)
    fx.starts[0].succeed()
    await until(lambda: all(t.done() for t in first))
    assert all(not t.exception() for t in first)
    # Space again once the queue emptied.
    _, fourth = ask(sup, "a")
    await handled(sup, fourth)
    assert fourth.done() and not fourth.exception()


async def test_cancelled_waiting_request_is_removed_and_triggers_no_start(
    harness: Harness,
) -> None:
    sup, fx = harness.sup, harness.fx
    _, a_task = ask(sup, "a")
    await until(lambda: len(fx.starts) == 1)
    _, b_task = ask(sup, "b")
    await handled(sup, b_task)
    assert sup.snapshot()["queued"]["models"] == {"a": 1, "b": 1}
    b_task.cancel()
    await handled(sup, b_task)
    assert b_task.cancelled()
    assert sup.snapshot()["queued"]["models"] == {"a": 1}
    assert sup.counters["cancelled_waiting"] == 1

    fx.starts[0].succeed()
    await until(a_task.done)
    sup.release(a_task.result(), served=True)
    await handled(sup)
    assert state_of(sup) == "ready"  # no swap for the cancelled b
    assert fx.started_keys == ["a@512"]


async def test_a_swap_whose_requests_left_is_called_off(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    a_engine, grant = await harness.ready("a")
    _, b_task = ask(sup, "b")
    await handled(sup, b_task)
    assert state_of(sup) == "draining"  # b needs a swap; a's lease holds it
    b_task.cancel()
    await handled(sup, b_task)
    assert state_of(sup) == "ready"  # nobody needs b any more: a stays
    assert triggers(sup)[-2:] == ["drain", "resume"]
    _, a_again = ask(sup, "a")
    await handled(sup, a_again)
    assert a_again.done() and not a_again.exception()  # granted on the same engine
    sup.release(grant, served=True)
    sup.release(a_again.result(), served=True)
    await handled(sup)
    assert fx.stops == [] and fx.started_keys == ["a@512"]
    assert engine_of(sup)["pid"] == a_engine.process.pid


async def test_an_idle_unload_drain_is_not_called_off(harness: Harness) -> None:
    sup = harness.sup
    _, grant = await harness.ready("a")
    unloaded = sup.unload()
    await handled(sup)
    assert state_of(sup) == "draining"
    sup.release(grant, served=True)
    await until(unloaded.done)
    assert state_of(sup) == "idle"


async def _cancelled_before_seen(config: GatewayConfig) -> tuple[Supervisor, FakeEffects]:
    """Arrival and cancellation both wait in the inbox when the supervisor first runs."""
    fx = FakeEffects()
    sup = Supervisor(config, fx)
    _, task = ask(sup, "a")
    await until(lambda: sup._inbox.qsize() == 1)  # the arrival is posted; nobody reads the inbox yet
    task.cancel()
    await until(task.cancelled)
    assert sup._inbox.qsize() == 2  # and the cancellation
    sup.start()
    await handled(sup)
    return sup, fx


async def _stop(sup: Supervisor) -> None:
    assert sup._task is not None
    assert not sup._task.done()
    sup._task.cancel()
    await asyncio.gather(sup._task, return_exceptions=True)


async def test_request_cancelled_before_the_supervisor_sees_it_starts_nothing() -> None:
    sup, fx = await _cancelled_before_seen(make_config())
    try:
        assert fx.starts == []
        assert state_of(sup) == "idle"
        assert sup.snapshot()["queued"]["count"] == 0
    finally:
        await _stop(sup)


async def test_cancel_racing_a_queue_full_refusal_keeps_the_supervisor_working() -> None:
    sup, _ = await _cancelled_before_seen(make_config(queue_limit=0))
    try:
        # The supervisor still decides: the next request is refused, not left hanging.
        _, other = ask(sup, "a")
        await handled(sup, other)
        assert isinstance(other.exception(), Unavailable)
        assert sup.counters["rejected_queue_full"] == 1
    finally:
        await _stop(sup)


async def test_cancel_racing_shutdown_is_handled_quietly() -> None:
    fx = FakeEffects()
    sup = Supervisor(make_config(), fx)
    closing = asyncio.ensure_future(sup.shutdown())
    await until(lambda: sup._inbox.qsize() == 1)  # the shutdown request waits in the inbox
    _, task = ask(sup, "a")  # arrives after the shutdown request, cancelled before it is seen
    await until(lambda: sup._inbox.qsize() == 2)
    task.cancel()
    await until(task.cancelled)
    sup.start()
    await asyncio.wait_for(closing, 1.0)
    await handled(sup)
    assert task.cancelled()
    assert fx.starts == []
    assert state_of(sup) == "idle"
    await sup.close()
    # (the autouse check below fails the test if handling the arrival raised)


@pytest.mark.parametrize("config", [make_config(idle=TICK)])
async def test_idle_timeout_unloads(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    a_engine, grant = await harness.ready("a")
    await asyncio.sleep(TICK * 2)
    assert state_of(sup) == "ready"  # in flight: never idle

    sup.release(grant, served=True)
    await handled(sup)
    assert state_of(sup) == "ready"
    await until(lambda: state_of(sup) == "idle")
    assert fx.stops == [a_engine]
    assert sup.counters["idle_unloads"] == 1
    assert states(sup)[-4:] == ["ready", "draining", "stopping", "idle"]
    assert "idle" in sup.history[-3].reason


async def test_shutdown_waits_for_the_lease_then_stops_the_engine(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    a_engine, grant = await harness.ready("a")
    _, queued_b = ask(sup, "b")
    await handled(sup, queued_b)
    closing = asyncio.ensure_future(sup.shutdown())
    await until(queued_b.done)
    await handled(sup)
    assert not closing.done()
    assert isinstance(queued_b.exception(), Unavailable)
    assert state_of(sup) == "draining"
    assert fx.stops == []

    _, late = ask(sup, "a")
    await handled(sup, late)
    assert isinstance(late.exception(), Unavailable)

    sup.release(grant, served=True)
    await asyncio.wait_for(closing, 1.0)
    assert fx.stops == [a_engine]
    assert state_of(sup) == "idle"
    assert fx.started_keys == ["a@512"]  # the queued b never started
    _, after = ask(sup, "a")  # the task lives on, so a late arrival is answered
    await handled(sup, after)
    assert isinstance(after.exception(), Unavailable)
    await sup.close()
    assert sup._task is not None and sup._task.done()


async def test_shutdown_serves_what_waits_for_a_running_engine_first(harness: Harness) -> None:
    """Nothing queued is lost: a request waiting for room on a running engine is served
    during the shutdown's drain; one that needs an engine started gets 503 at once."""
    sup, fx = harness.sup, harness.fx
    _, first = ask(sup, "a", tokens=300, reserve=100)
    await until(lambda: len(fx.starts) == 1)
    a_engine = fx.starts[0].succeed(kv_budget=600)  # room for one such request at a time
    await until(first.done)
    _, queued_a = ask(sup, "a", tokens=300, reserve=100)
    _, queued_b = ask(sup, "b")
    await handled(sup, queued_a, queued_b)
    assert not queued_a.done()
    closing = asyncio.ensure_future(sup.shutdown())
    await until(queued_b.done)
    error = queued_b.exception()
    assert isinstance(error, Unavailable) and error.headers.get("Retry-After")
    assert not queued_a.done() and state_of(sup) == "ready"

    sup.release(first.result(), served=True)
    await until(queued_a.done)
    assert queued_a.result().instance is a_engine  # served on the running engine
    assert not closing.done()
    sup.release(queued_a.result(), served=True)
    await asyncio.wait_for(closing, 1.0)
    assert fx.stops == [a_engine] and state_of(sup) == "idle"


async def test_shutdown_during_a_start_serves_the_request_it_is_for(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    _, task = ask(sup, "a")
    await until(lambda: len(fx.starts) == 1)
    closing = asyncio.ensure_future(sup.shutdown())
    await handled(sup)
    assert not fx.starts[0].cancelled and not task.done()
    engine = fx.starts[0].succeed()
    await until(task.done)
    assert task.result().instance is engine
    sup.release(task.result(), served=True)
    await asyncio.wait_for(closing, 1.0)
    assert fx.stops == [engine]


async def test_shutdown_during_a_start_nobody_waits_for_aborts_it(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    variant = sup.config.models[0].variants[0]
    loading = sup.load(variant)
    await until(lambda: len(fx.starts) == 1)
    closing = asyncio.ensure_future(sup.shutdown())
    await until(lambda: fx.starts[0].cancelled)
    await asyncio.wait_for(closing, 1.0)
    assert isinstance(loading.exception(), Unavailable)
    assert transitions(sup) == ["idle->starting", "starting->stopping", "stopping->idle"]


async def test_estimate_over_running_variant_counts_first_then_upgrades(
    harness: Harness,
) -> None:
    sup, fx = harness.sup, harness.fx
    a_engine, first = await harness.ready("a", tokens=100)
    # ~2000 estimated tokens: over the running 512, but it runs: count there first.
    pending, task = ask(sup, "a", tokens=None, text_bytes=4000)
    await handled(sup, task)
    grant = task.result()
    assert grant.instance is a_engine
    assert grant.count_first
    assert state_of(sup) == "ready"

    # The handler counted 1500 exactly: too big for 512; it releases with a reason.
    pending.exact_tokens, pending.method = 1500, "exact"
    sup.release(grant, requeue_reason="counted 1500 + 100 > 512: upgrade")
    again = acquire(sup, pending)
    await handled(sup, again)
    assert sup.counters["requeued"] == 1
    assert state_of(sup) == "draining"  # the first request is still in flight
    assert not again.done()

    sup.release(first, served=True)
    await until(lambda: len(fx.starts) == 2)
    assert fx.stops == [a_engine]
    assert fx.started_keys == ["a@512", "a@2048"]
    bigger = fx.starts[1].succeed()
    await until(again.done)
    upgraded = again.result()
    assert upgraded.instance is bigger
    assert not upgraded.count_first
    assert states(sup) == ["idle", "starting", *SWAP]
    mine = [s for s in sup.scheduler.selections if s["request_id"] == pending.request_id]
    assert (mine[-1]["outcome"], mine[-1]["context"]) == ("upgraded", 2048)
    assert mine[-1]["method"] == "exact" and mine[-1]["prompt_tokens"] == 1500


@pytest.mark.parametrize("config", [make_config(queue_limit=1)])
async def test_a_requeued_request_keeps_its_place_even_when_the_queue_is_full(
    harness: Harness,
) -> None:
    sup, fx = harness.sup, harness.fx
    _, first = await harness.ready("a", tokens=100)
    pending, task = ask(sup, "a", tokens=None, text_bytes=4000)
    await handled(sup, task)
    grant = task.result()
    _, b_task = ask(sup, "b")  # fills the queue
    await handled(sup, b_task)
    assert not b_task.done()

    pending.exact_tokens, pending.method = 1500, "exact"
    sup.release(grant, requeue_reason="too big")
    again = acquire(sup, pending)
    await handled(sup, again)
    assert not again.done(), again  # waiting, not refused: it was accepted before
    assert sup.scheduler.queue[0] is pending  # it came first, before b
    sup.release(first, served=True)
    await until(lambda: len(fx.starts) == 2)
    assert fx.started_keys[-1] == "a@2048"  # the head (the requeued a) decides


async def test_context_too_large_is_rejected_without_a_start(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    _, task = ask(sup, "a", tokens=8100, reserve=100)
    await handled(sup, task)
    with pytest.raises(ContextLengthExceeded) as info:
        task.result()
    assert "8200" in info.value.message and "8192" in info.value.message
    assert info.value.param == "messages"
    assert fx.starts == []
    assert state_of(sup) == "idle"
    assert sup.scheduler.selections[-1]["outcome"] == "rejected"


async def test_rejection_while_another_engine_runs_leaves_it_alone(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    await harness.ready("a")
    _, task = ask(sup, "b", tokens=5000)
    await handled(sup, task)
    assert isinstance(task.exception(), ContextLengthExceeded)
    assert state_of(sup) == "ready"
    assert fx.stops == [] and len(fx.starts) == 1


async def test_capacity_from_effects_decides_the_variant() -> None:
    fx = FakeEffects(capacity=lambda v: v.context // 2)  # like -np 2
    sup = Supervisor(make_config(), fx)
    sup.start()
    try:
        _, task = ask(sup, "a", tokens=300, reserve=100)
        await until(lambda: len(fx.starts) == 1)
        assert fx.started_keys == ["a@2048"]  # 400 > 512 / 2
        fx.starts[0].succeed(slot_context=1024)
        await until(task.done)
        _, too_big = ask(sup, "a", tokens=4000, reserve=100)
        await handled(sup, too_big)
        assert isinstance(too_big.exception(), ContextLengthExceeded)
        assert "4096" in too_big.exception().message
    finally:
        await _stop(sup)


async def test_reload_removing_a_waiting_requests_model_does_not_wedge(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    _, a_task = ask(sup, "a")
    _, b_task = ask(sup, "b")
    await handled(sup, a_task, b_task)
    await until(lambda: len(fx.starts) == 1)
    old = sup.config
    sup.reload(GatewayConfig(old.source, old.server, (old.models[0],)))  # "b" is gone
    await handled(sup)
    assert sup.config.resolve("b") is None
    fx.starts[0].succeed()
    await until(a_task.done)  # the queue still moves
    sup.release(a_task.result(), served=True)
    # b was accepted under the old config: it is served, not left waiting forever.
    await until(lambda: len(fx.starts) == 2)
    assert fx.started_keys == ["a@512", "b@4096"]
    fx.starts[1].succeed()
    await until(b_task.done)
    assert not b_task.exception()


@pytest.mark.parametrize("config", [make_config(max_start_failures=1)])
async def test_crashes_up_to_the_limit_fail_the_models_waiters(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    a_engine, _ = await harness.ready("a")
    _, b_task = ask(sup, "b")
    await handled(sup, b_task)
    _, a_waiting = ask(sup, "a")  # behind b: waits for the engine after b's
    await handled(sup, a_waiting)
    assert state_of(sup) == "draining"
    assert not a_waiting.done()
    a_engine.crash(-6)
    await until(a_waiting.done)
    with pytest.raises(Unavailable) as info:
        a_waiting.result()
    assert "keeps failing" in info.value.message
    assert "last words" in info.value.message
    assert transitions(sup)[-3:] == ["draining->crashed", "crashed->idle", "idle->starting"]
    await until(lambda: len(fx.starts) == 2)
    assert fx.started_keys[-1] == "b@4096"
    fx.starts[-1].succeed()
    await until(b_task.done)
    assert not b_task.exception()


async def test_unload_drains_after_the_lease_and_stops(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    a_engine, grant = await harness.ready("a")
    unloaded = sup.unload()
    await handled(sup)
    assert state_of(sup) == "draining"
    assert fx.stops == []
    assert not unloaded.done()  # it answers once no engine runs
    sup.release(grant, served=True)
    await until(unloaded.done)
    assert fx.stops == [a_engine]
    assert state_of(sup) == "idle"
    assert engine_of(sup)["pid"] is None


async def test_a_shared_kv_cache_admits_only_what_fits(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    _, first = ask(sup, "a", tokens=400, reserve=100)  # needs 500 of a 512 cache
    await until(lambda: len(fx.starts) == 1)
    fx.starts[0].succeed(kv_budget=512)
    await until(first.done)
    _, second = ask(sup, "a", tokens=50, reserve=10)  # 60 more: 560 > 512
    _, third = ask(sup, "a", tokens=1, reserve=1)  # would fit, but waits its turn
    await handled(sup, second, third)
    assert not second.done() and not third.done()
    assert sup.snapshot()["queued"]["count"] == 2 and state_of(sup) == "ready"
    sup.release(first.result(), served=True)
    await until(lambda: second.done() and third.done())  # both fit once the first ended
    assert fx.started_keys == ["a@512"]  # waiting for room is not a swap


async def test_an_exact_count_updates_the_reservation(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    pending, first = ask(sup, "a", tokens=None, reserve=10)  # estimated: counted on the engine
    await until(lambda: len(fx.starts) == 1)
    fx.starts[0].succeed(kv_budget=512)
    await until(first.done)
    grant = first.result()
    assert grant.count_first
    fits = sup.confirm(grant, pending.shape, 480)  # counted: 490 of 512 reserved now
    _, second = ask(sup, "a", tokens=30, reserve=10)
    await handled(sup, second)
    assert fits.result() is True
    assert not second.done()
    sup.release(grant, served=True)
    await until(second.done)


async def test_an_idle_engine_takes_a_request_whatever_its_estimate(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    _, task = ask(sup, "a", tokens=None, reserve=10, text_bytes=4000)  # estimate far over 512
    await until(lambda: len(fx.starts) == 1)
    fx.starts[0].succeed(kv_budget=512)
    await until(task.done)  # granted to be counted, not stuck
    assert task.result().count_first


async def test_a_start_nobody_waits_for_is_cut_short(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    _, task = ask(sup, "a")
    await until(lambda: len(fx.starts) == 1)
    assert state_of(sup) == "starting"
    task.cancel()
    await until(lambda: state_of(sup) == "idle")
    assert fx.starts[0].cancelled  # the effect was cancelled: the engine is killed
    assert triggers(sup) == ["start", "abort", "stopped"]


async def test_a_start_still_wanted_by_another_request_goes_on(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    _, first = ask(sup, "a")
    _, second = ask(sup, "a")
    await handled(sup, first, second)
    await until(lambda: len(fx.starts) == 1)
    first.cancel()
    await handled(sup, first)
    assert sup.counters["cancelled_waiting"] == 1
    assert state_of(sup) == "starting" and not fx.starts[0].cancelled
    assert isinstance(sup.slots["a"].phase, Starting)
    assert not sup.slots["a"].phase.task.cancelling()
    fx.starts[0].succeed()
    await until(second.done)
    assert not second.exception()


async def test_a_count_over_the_free_shared_cache_sends_the_request_back(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    _, first = ask(sup, "a", tokens=300, reserve=100)  # 400 of 512
    await until(lambda: len(fx.starts) == 1)
    engine = fx.starts[0].succeed(kv_budget=512)
    await until(first.done)
    pending, second = ask(sup, "a", tokens=None, reserve=10, text_bytes=40)  # estimate: ~40
    await handled(sup, second)
    grant = second.result()  # granted on its estimate, beside the first
    assert grant.instance is engine and grant.count_first

    # Counted exactly on the engine: 400 + 310 > 512. The handler sends it back to wait.
    assert await sup.confirm(grant, pending.shape, 300) is False
    pending.exact_tokens, pending.method = 300, "exact"
    sup.release(grant, requeue_reason="counted 300 prompt tokens: no room in the shared KV cache yet")
    again = acquire(sup, pending)
    await handled(sup, again)
    assert not again.done()  # it waits for room ...
    assert sup.snapshot()["queued"]["count"] == 1 and sup.counters["requeued"] == 1
    assert state_of(sup) == "ready"  # ... on the same engine: waiting for room is no swap

    sup.release(first.result(), served=True)
    await until(again.done)  # room once the first ended
    regrant = again.result()
    assert regrant.instance is engine and not regrant.count_first
    assert await sup.confirm(regrant, pending.shape, 300) is True  # alone, 310 fits 512
    assert fx.started_keys == ["a@512"] and fx.stops == []


class RaisingStop(FakeEffects):
    async def stop(self, instance: FakeInstance) -> int:
        raise RuntimeError("the output reader broke")


async def test_a_stop_that_raises_still_ends_in_idle() -> None:
    fx = RaisingStop()
    sup = Supervisor(make_config(), fx)
    sup.start()
    try:
        _, task = ask(sup, "a")
        await until(lambda: len(fx.starts) == 1)
        engine = fx.starts[0].succeed()
        await until(task.done)
        sup.release(task.result(), served=True)
        await sup.unload()
        assert state_of(sup) == "idle" and engine.process.killed
    finally:
        await sup.close()


class UnloadAsTheStartEnds(FakeEffects):
    """The first start posts an unload just before it returns: the supervisor sees the
    unload while still `starting`, with the start's effect over and its result next."""

    def __init__(self) -> None:
        super().__init__()
        self.sup: Supervisor | None = None
        self.unloaded: asyncio.Future[None] | None = None

    async def start(self, model: Model, variant: Variant) -> FakeInstance:
        instance = await super().start(model, variant)
        if self.unloaded is None:
            assert self.sup is not None
            self.unloaded = self.sup.unload()
        return instance


async def test_an_unload_that_races_the_end_of_a_start_is_honoured() -> None:
    fx = UnloadAsTheStartEnds()
    sup = Supervisor(make_config(), fx)
    fx.sup = sup
    sup.start()
    try:
        _, task = ask(sup, "a")
        await until(lambda: len(fx.starts) == 1)
        engine = fx.starts[0].succeed()
        # Too late to cancel the start (its effect is over): the start is cut short all
        # the same, and the engine it started is stopped without a grant; the unload is
        # answered.
        await until(lambda: fx.unloaded is not None and fx.unloaded.done())
        assert fx.unloaded is not None and fx.unloaded.result() is None
        history = [(r.trigger, r.reason) for r in sup.history]
        assert [trigger for trigger, _ in history[:3]] == ["start", "abort", "stopped"]
        assert history[1][1] == "unload requested"
        assert fx.stops == [engine] and not fx.starts[0].cancelled
        assert not task.done()  # the waiting request then starts it again
        await until(lambda: len(fx.starts) == 2)
    finally:
        await sup.close()


class SlowKill(FakeEffects):
    """Like the real start: once cancelled, it kills its engine (shielded, it takes a while:
    until the test completes `killed`) and only then ends. A second cancellation would cut
    that short and leave the engine still exiting while the next one spawns."""

    async def start(self, model: Model, variant: Variant) -> FakeInstance:
        call = StartCall(model, variant)
        self.starts.append(call)
        try:
            return await call.future
        except asyncio.CancelledError:
            call.cancelled = True
            call.cancels += 1
            try:
                await asyncio.shield(call.killed)
            except asyncio.CancelledError:
                call.cancels += 1
                raise
            raise


async def test_a_start_is_cancelled_only_once() -> None:
    fx = SlowKill()
    sup = Supervisor(make_config(), fx)
    sup.start()
    try:
        _, task = ask(sup, "a")
        await until(lambda: len(fx.starts) == 1)
        call = fx.starts[0]
        task.cancel()
        await until(lambda: call.cancels == 1)  # cut short: its engine is being killed
        others = [ask(sup, "b")[1] for _ in range(5)]  # more events while the start winds down
        await handled(sup, *others)
        for other in others:
            other.cancel()
        await handled(sup, *others)
        assert sup.snapshot()["queued"]["count"] == 0
        assert triggers(sup) == ["start", "abort"]  # cut short at once; its engine is not gone yet

        call.killed.set_result(None)
        await until(lambda: state_of(sup) == "idle")
        assert call.cancels == 1
        assert triggers(sup) == ["start", "abort", "stopped"]
    finally:
        for started in fx.starts:  # (a failed test: let every kill end, so close() returns)
            if not started.killed.done():
                started.killed.set_result(None)
        await sup.close()


async def test_a_load_pending_across_a_reload_loads_the_new_config(harness: Harness) -> None:
    sup, fx = harness.sup, harness.fx
    old = sup.config
    loading = sup.load(old.models[0].variants[0])
    await until(lambda: len(fx.starts) == 1)
    a = old.models[0]
    variants = tuple(replace(v, args=("--temp", "0")) for v in a.variants)
    new_a = replace(a, args=("--seed", "7"), variants=variants)
    sup.reload(GatewayConfig(old.source, old.server, (new_a, *old.models[1:])))
    await handled(sup)
    outdated = fx.starts[0].succeed()  # the old config's engine: ready, but outdated
    await until(lambda: len(fx.starts) == 2)
    assert fx.stops == [outdated]
    assert [r.reason for r in sup.history if r.trigger == "drain"] == ["config reload changed a@512"]
    assert not loading.done()  # the load waits for the engine the new config defines
    restarted = fx.starts[1]
    assert restarted.model.args == ("--seed", "7")
    assert restarted.variant.args == ("--temp", "0")
    assert restarted.variant is variants[0]
    engine = restarted.succeed()
    await until(loading.done)
    assert loading.result() is None
    await handled(sup)
    assert state_of(sup) == "ready" and engine_of(sup)["pid"] == engine.process.pid
    assert len(fx.starts) == 2  # and no loop of restarts


async def test_a_long_back_off_never_postpones_a_shorter_one(harness: Harness) -> None:
    sup = harness.sup
    loop = asyncio.get_running_loop()
    sup._arm_retry(0.2)
    sup._arm_retry(8.0)  # another variant's longer back-off
    assert sup._retry is not None and sup._retry.when() <= loop.time() + 0.2
    sup._arm_retry(0.05)
    assert sup._retry.when() <= loop.time() + 0.05
