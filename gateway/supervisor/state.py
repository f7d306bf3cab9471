"""The supervisor's state, in one place: what its run loop, its engine steps and its
control steps read and write (all from the one supervisor task)."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.config.schema import GatewayConfig, Model, Variant
from gateway.engine.manager import EngineInstance
from gateway.errors import GatewayError
from gateway.models import TokenEstimator
from gateway.supervisor import events as ev
from gateway.supervisor.machine import EngineLifecycle
from gateway.supervisor.requests import PendingRequest
from gateway.utils.metrics import Metrics

RECENT_SELECTIONS = 20


class Effects(Protocol):
    """What the supervisor does to the world: the EngineManager, or a fake in tests."""

    def capacity(self, variant: Variant, model: Model) -> int: ...

    async def start(self, model: Model, variant: Variant) -> EngineInstance: ...

    async def stop(self, instance: EngineInstance) -> int: ...


@dataclass
class Lease:
    pending: PendingRequest
    instance: EngineInstance
    tokens: int  # context it reserves on its engine: its needs, exact once counted


class SupervisorState:
    def __init__(self, config: GatewayConfig, effects: Effects, metrics: Metrics | None = None) -> None:
        self.config = config
        self._effects = effects
        self.lifecycle = EngineLifecycle()
        self.estimator = TokenEstimator()
        self._inbox: asyncio.Queue[ev.Event] = asyncio.Queue()
        self._queue: list[PendingRequest] = []
        self._leases: dict[int, Lease] = {}
        self._instance: EngineInstance | None = None  # from ready until stopped (None while starting)
        self._target: Variant | None = None  # what starting is starting
        self._effect: asyncio.Task[None] | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._failures: Counter[str] = Counter()  # failed starts or crashes in a row, per model
        self._retry_at: dict[str, float] = {}  # per model: no restart before (monotonic)
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

    def _post(self, event: ev.Event) -> None:
        self._inbox.put_nowait(event)

    def _fail_waiters(self, error: GatewayError, model_name: str | None = None) -> None:
        """Answer the queued requests (of one model, or all) with `error`."""
        for pending in [p for p in self._queue if model_name in (None, p.model.name)]:
            self._queue.remove(pending)
            assert pending.future is not None
            pending.future.set_exception(error)

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

    def _instance_leases(self) -> int:
        return self._count_leases(self._instance) if self._instance is not None else 0

    def _count_leases(self, instance: EngineInstance) -> int:
        return sum(1 for lease in self._leases.values() if lease.instance is instance)
