"""The supervisor's state, in one place: what its run loop, its engine steps and its
control steps read and write (all from the one supervisor task)."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.config.schema import GatewayConfig, Model, Variant
from gateway.engine.manager import EngineInstance
from gateway.errors import GatewayError
from gateway.models import Room, TokenEstimator
from gateway.supervisor import events as ev
from gateway.supervisor.machine import EngineLifecycle
from gateway.supervisor.requests import PendingRequest
from gateway.utils.metrics import Metrics

RECENT_SELECTIONS = 20


class Effects(Protocol):
    """What the supervisor does to the world: the EngineManager, or a fake in tests."""

    def capacity(self, variant: Variant, model: Model) -> Room: ...

    def longest_token(self, variant: Variant) -> int | None:
        """The UTF-8 length of the longest token of the variant's model, when known."""
        ...

    async def start(self, model: Model, variant: Variant) -> EngineInstance: ...

    async def stop(self, instance: EngineInstance) -> int: ...

    async def busy_tasks(self, instance: EngineInstance) -> frozenset[int]:
        """The ids of the tasks the engine's slots are processing now."""
        ...

    async def probe(self, instance: EngineInstance) -> str | None:
        """None when the engine answers /health within its health_check timeout, else why not."""
        ...


@dataclass
class Lease:
    pending: PendingRequest
    instance: EngineInstance
    tokens: int  # context it reserves on its engine: its needs, exact once counted
    slots: int = 1  # engine slots its sequences take


@dataclass
class Ghost:
    """A lease whose client left while its engine was still at work on it.

    llama-server goes on with a request until it notices the closed connection (after
    its current batch, or its next one-second poll), so the cells it holds in a shared
    KV cache are not free yet: the ghost keeps them reserved until the engine's /slots
    show that none of the tasks that ran when it was abandoned runs any more.
    """

    lease: Lease
    look: int  # the first look at /slots sent after it was abandoned
    running: frozenset[int] | None = None  # the tasks that look saw busy


class SupervisorState:
    def __init__(self, config: GatewayConfig, effects: Effects, metrics: Metrics | None = None) -> None:
        self.config = config
        self._effects = effects
        self.lifecycle = EngineLifecycle()
        self.estimator = TokenEstimator()
        self._inbox: asyncio.Queue[ev.Event] = asyncio.Queue()
        self._queue: list[PendingRequest] = []
        self._leases: dict[int, Lease] = {}
        self._ghosts: list[Ghost] = []
        self._looking_at_slots: asyncio.Task[None] | None = None  # a /slots look for the ghosts
        self._looks = 0  # looks at /slots sent
        self._instance: EngineInstance | None = None  # from ready until stopped (None while starting)
        self._target: Variant | None = None  # what starting is starting
        self._effect: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None  # a health probe under way
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._failures: Counter[str] = Counter()  # failed starts or crashes in a row, per variant
        self._retry_at: dict[str, float] = {}  # per variant key: no restart before (monotonic)
        self._seq = itertools.count(1)
        self._shutdown: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.selections: deque[dict[str, Any]] = deque(maxlen=RECENT_SELECTIONS)
        self.counters: Counter[str] = Counter()
        self.last_engine_lines: list[str] = []
        self.metrics = metrics or Metrics()
        self._wanted: tuple[Variant, asyncio.Future[None]] | None = None  # a load ahead of traffic
        self._unloading: list[asyncio.Future[None]] = []  # unload callers waiting for idle
        self._draining_for_swap = False  # a drain only the queue asked for can be called off
        self._faults_seen: set[str] = set()  # causes whose traceback was logged

    def _post(self, event: ev.Event) -> None:
        self._inbox.put_nowait(event)

    def _fail_waiters(
        self, error: GatewayError, which: Callable[[PendingRequest], bool] | None = None
    ) -> None:
        """Answer the queued requests (all, or `which` of them) with `error`."""
        for pending in [p for p in self._queue if which is None or which(p)]:
            self._queue.remove(pending)
            fail(pending.future, error)

    def _cancel_wanted(self, error: GatewayError) -> None:
        if self._wanted is not None:
            if not self._wanted[1].done():
                self._wanted[1].set_exception(error)
            self._wanted = None

    def _cancel_start(self) -> None:
        """Cut a start short, once: the start effect kills its engine before it ends."""
        if self._effect is not None and not self._effect.done() and not self._effect.cancelling():
            self._effect.cancel()

    def _count(self, name: str, model: str, amount: int = 1) -> None:
        self.counters[name] += amount
        self.metrics.count(name, model, amount)

    def _fire(self, trigger: str, reason: str) -> None:
        self.lifecycle.fire(trigger, reason)

    def _engine_at_work(self) -> bool:
        """Requests in flight on the engine, or abandoned ones it has not let go of yet:
        llama-server ignores SIGTERM while it still runs a request, so a stop waits."""
        return bool(self._instance_leases() or self._ghosts)

    def _instance_leases(self) -> int:
        return self._count_leases(self._instance) if self._instance is not None else 0

    def _count_leases(self, instance: EngineInstance) -> int:
        return sum(1 for lease in self._leases.values() if lease.instance is instance)

    def _held(self, instance: EngineInstance) -> list[Lease]:
        """What holds room on the engine: its leases and its ghosts."""
        ghosts = [ghost.lease for ghost in self._ghosts]
        return [lease for lease in (*self._leases.values(), *ghosts) if lease.instance is instance]


def fail(future: asyncio.Future[Any] | None, error: GatewayError) -> None:
    """Answer a waiter with `error`, unless it has its answer already."""
    if future is not None and not future.done():
        future.set_exception(error)
