"""An engine slot: one model's engine, its state machine, and the data of its phase.

The supervisor owns every slot and is the only caller of its methods. Each method that
changes the phase fires the machine's trigger and stores the new phase's data in one
step, so the machine's state and the typed phase never disagree. The effects a slot
launches (start, stop, health probe, a look at /slots) run as tasks whose results come
back to the supervisor as events; timers post events too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from gateway.config.schema import Model, Variant
from gateway.engine.adapter import StartFailed
from gateway.engine.manager import EngineInstance
from gateway.supervisor import events as ev
from gateway.supervisor.effects import Effects
from gateway.supervisor.machine import EngineLifecycle, EngineState, TransitionRecord
from gateway.supervisor.requests import Lease

log = logging.getLogger("gateway.supervisor")


# --- the data of each phase -----------------------------------------------------------------


@dataclass
class Down:
    """idle or crashed: no process."""


@dataclass
class Starting:
    variant: Variant
    task: asyncio.Task[None]


@dataclass
class Ready:
    instance: EngineInstance


@dataclass
class Draining:
    instance: EngineInstance
    reason: str
    # A drain the queue asked for (a swap, an eviction) is called off when nothing
    # needs it any more; one for an unload, a reload or the shutdown is not.
    resumable: bool


@dataclass
class Stopping:
    instance: EngineInstance | None  # None: a start cut short (its task kills the engine)
    task: asyncio.Task[None]


Phase = Down | Starting | Ready | Draining | Stopping


class Timer(StrEnum):
    IDLE = "idle"  # engine_idle_timeout passed with nothing to do: unload
    DRAIN = "drain"  # drain_timeout passed: cut off what is still in flight
    PROBE = "probe"  # probe /health while requests are in flight
    SLOTS = "slots"  # look at /slots again while abandoned requests may still run


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


@dataclass
class Memory:
    """A variant's footprint in bytes: predicted before its start, measured after."""

    estimate: int  # the config's `memory` when declared
    measured: int | None = None
    declared: bool = False

    @property
    def reserved(self) -> int:
        """What decisions count: a declared footprint, else the larger of the two."""
        return self.estimate if self.declared else max(self.estimate, self.measured or 0)

    def as_json(self) -> dict[str, int | bool | None]:
        return {
            "estimate": self.estimate,
            "measured": self.measured,
            "reserved": self.reserved,
            "declared": self.declared,
        }


@dataclass(eq=False)
class EngineSlot:
    """One model's engine (at most one per model)."""

    model: str
    post: Callable[[ev.Event], None]
    on_record: Callable[[TransitionRecord], None]
    lifecycle: EngineLifecycle = field(init=False)
    phase: Phase = field(default_factory=Down)
    memory: Memory | None = None  # of the variant it runs or starts
    last_used: float = field(default_factory=time.monotonic)  # its last grant, or its start
    last_used_wall: float = field(default_factory=time.time)  # the same, as wall time
    ghosts: list[Ghost] = field(default_factory=list)
    looks: int = 0  # looks at /slots sent
    stops: int = 0  # times its engine went away (stopped, crashed, or a start cut short)
    looking: asyncio.Task[None] | None = None  # a look at /slots under way
    # Tokens of finished requests that idle engine slots may still hold (a unified cache
    # keeps a slot's cells until a new task's prompt is processed there, and a longer
    # prompt in a lower slot is processed first): at most one stale prompt per engine
    # slot, so the largest `slots` of them bound it. Emptied when the engine erases them.
    residue: list[int] = field(default_factory=list)
    clearing: asyncio.Task[None] | None = None  # an erase of idle slots under way
    probing: asyncio.Task[None] | None = None  # a health probe under way
    last_lines: list[str] = field(default_factory=list)  # the last engine's last words
    timers: dict[Timer, asyncio.TimerHandle] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lifecycle = EngineLifecycle(self.model, self.on_record)

    # --- what it is ------------------------------------------------------------------------

    @property
    def state(self) -> EngineState:
        return self.lifecycle.current

    @property
    def instance(self) -> EngineInstance | None:
        """The engine process, from ready until it has stopped."""
        return None if isinstance(self.phase, Down | Starting) else self.phase.instance

    @property
    def variant(self) -> Variant | None:
        """What runs, or is starting."""
        if isinstance(self.phase, Starting):
            return self.phase.variant
        instance = self.instance
        return instance.variant if instance is not None else None

    @property
    def ready(self) -> EngineInstance | None:
        return self.phase.instance if isinstance(self.phase, Ready) else None

    @property
    def active(self) -> bool:
        """It holds (or is about to hold) memory: anything but idle or crashed."""
        return not isinstance(self.phase, Down)

    def touch(self) -> None:
        """It was used now (least recently used engines are evicted first)."""
        self.last_used, self.last_used_wall = time.monotonic(), time.time()

    # --- phase changes: trigger and data in one step -------------------------------------------

    def start(self, model: Model, variant: Variant, effects: Effects, reason: str) -> None:
        self.lifecycle.fire("start", reason)
        self.touch()
        self.phase = Starting(variant, self._launch(self._starting(effects, model, variant)))

    def abort(self, reason: str) -> None:
        """Cut a start short: `abort` now; its effect kills the engine and reports."""
        assert isinstance(self.phase, Starting)
        self.lifecycle.fire("abort", reason)
        self.phase.task.cancel()
        self.phase = Stopping(None, self.phase.task)

    def healthy(self, instance: EngineInstance) -> None:
        self.lifecycle.fire(
            "healthy",
            f"{instance.where} in {instance.startup_seconds * 1000:.0f} ms",
        )
        self.phase = Ready(instance)
        self._watch_exit(instance)

    def start_failed(self, error: StartFailed) -> None:
        self.lifecycle.fire("fail", str(error))
        self._gone()
        self.last_lines = error.last_lines

    def drain(self, reason: str, resumable: bool, drain_timeout: float) -> None:
        instance = self.ready
        assert instance is not None
        self.cancel(Timer.IDLE)
        self.lifecycle.fire("drain", reason)
        self.phase = Draining(instance, reason, resumable)
        self.arm(Timer.DRAIN, drain_timeout)

    def resume(self, reason: str) -> None:
        assert isinstance(self.phase, Draining)
        self.cancel(Timer.DRAIN)
        self.lifecycle.fire("resume", reason)
        self.phase = Ready(self.phase.instance)

    def stop(self, effects: Effects, reason: str) -> None:
        assert isinstance(self.phase, Draining)
        instance = self.phase.instance
        self.cancel(Timer.DRAIN)
        self.lifecycle.fire("drained", reason)
        self._end_engine_calls()
        self.phase = Stopping(instance, self._launch(self._stopping(effects, instance)))

    def stop_what_started(self, effects: Effects, instance: EngineInstance) -> None:
        """A start cut short (already `stopping`) that succeeded all the same: stop the
        engine it started, with the same effect as any stop."""
        assert isinstance(self.phase, Stopping) and self.phase.instance is None
        self.phase = Stopping(instance, self._launch(self._stopping(effects, instance)))

    def stopped(self, reason: str) -> None:
        self.lifecycle.fire("stopped", reason)
        self._gone()

    def died(self, reason: str) -> None:
        self.lifecycle.fire("died", reason)
        self._gone()

    def reset(self, reason: str) -> None:
        self.lifecycle.fire("reset", reason)

    def _gone(self) -> None:
        self.stops += 1
        instance = self.instance
        if instance is not None:
            self.last_lines = instance.process.last_lines()
        self.phase = Down()
        self.residue.clear()
        for timer in list(self.timers):
            self.cancel(timer)
        self._end_engine_calls()

    def _end_engine_calls(self) -> None:
        """Give up its probe, look at /slots and erase: its engine stops or is gone. A call
        still waiting at SIGTERM keeps llama-server from exiting (the call's handler
        waits on the stopped task loop until its connection closes)."""
        self.ghosts.clear()  # gone with their engine
        self.cancel(Timer.SLOTS)
        for task in (self.probing, self.looking, self.clearing):
            if task is not None:
                task.cancel()
        self.probing = self.looking = self.clearing = None

    # --- effects: tasks whose results come back as events ------------------------------------

    def _launch(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return asyncio.create_task(coro, name=f"engine {self.model}")

    async def _starting(self, effects: Effects, model: Model, variant: Variant) -> None:
        try:
            instance = await effects.start(model, variant)
        except StartFailed as exc:
            self.post(ev.StartFinished(self.model, variant, None, exc))
        except asyncio.CancelledError:
            self.post(ev.StartFinished(self.model, variant, None, StartFailed("aborted", "start aborted")))
            raise
        except Exception as exc:  # an engine answering nonsense while starting
            self.post(ev.StartFinished(self.model, variant, None, StartFailed("exited", str(exc))))
        else:
            self.post(ev.StartFinished(self.model, variant, instance, None))

    async def _stopping(self, effects: Effects, instance: EngineInstance) -> None:
        try:
            code = await effects.stop(instance)
        except Exception:
            log.exception("stopping %s failed: killing it", instance.variant.key)
            instance.process.kill_now()
            code = -9
        self.post(ev.StopFinished(instance, code))

    def _watch_exit(self, instance: EngineInstance) -> None:
        def exited(task: asyncio.Task[int]) -> None:
            if not task.cancelled():
                self.post(ev.EngineExited(instance, task.result()))

        instance.exited.add_done_callback(exited)

    def probe(self, effects: Effects, instance: EngineInstance) -> None:
        async def probing() -> None:
            self.post(ev.EngineProbed(instance, await effects.probe(instance)))

        self.probing = asyncio.create_task(probing(), name=f"probe {self.model}")

    def look_at_slots(self, effects: Effects) -> None:
        """Ask the engine which tasks it runs (one look at a time)."""
        instance = self.instance
        if self.looking is not None or not self.ghosts or instance is None:
            return
        self.looks += 1
        look = self.looks

        async def looking() -> None:
            try:
                busy: frozenset[int] | None = await effects.busy_tasks(instance)
            except Exception:  # looked again later; a dead engine's ghosts go with it
                busy = None
            self.post(ev.SlotsSeen(instance, busy, look))

        self.looking = asyncio.create_task(looking(), name=f"slots {self.model}")

    def leave_residue(self, tokens: int, slots: int) -> None:
        """A request on the engine ended: its cells may stay in an idle slot."""
        self.residue = sorted([*self.residue, tokens], reverse=True)[:slots]

    def clear_idle_slots(self, effects: Effects) -> None:
        """Have the engine erase its idle slots (one erase at a time)."""
        instance = self.instance
        if self.clearing is not None or instance is None:
            return

        async def clearing() -> None:
            try:
                await effects.clear_idle_slots(instance)
            except Exception:  # a dead engine's residue goes with it; a live one's stays
                self.post(ev.IdleSlotsCleared(instance, cleared=False))
            else:
                self.post(ev.IdleSlotsCleared(instance, cleared=True))

        self.clearing = asyncio.create_task(clearing(), name=f"clear {self.model}")

    def tasks(self) -> list[asyncio.Task[Any]]:
        """Its effects under way (for the supervisor's close)."""
        running = [self.probing, self.looking, self.clearing]
        if isinstance(self.phase, Starting | Stopping):
            running.append(self.phase.task)
        return [task for task in running if task is not None]

    # --- timers ---------------------------------------------------------------------------------

    def arm(self, timer: Timer, delay: float) -> None:
        self.cancel(timer)
        self.timers[timer] = asyncio.get_running_loop().call_later(
            delay, self.post, ev.TimerFired(self.model, timer.value, self.instance)
        )

    def armed(self, timer: Timer) -> bool:
        return timer in self.timers

    def cancel(self, timer: Timer) -> None:
        handle = self.timers.pop(timer, None)
        if handle is not None:
            handle.cancel()
