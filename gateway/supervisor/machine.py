"""The engine's lifecycle as a `transitions` state machine, defined once as data.

The supervisor is the only caller of the triggers. They are synchronous on purpose:
a trigger only records the step, so it cannot be cancelled halfway; spawning, health
waits and kills run outside, and their results come back to the supervisor as events.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from transitions import EventData, Machine


class EngineState(StrEnum):
    IDLE = "idle"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"
    CRASHED = "crashed"


STATES = [state.value for state in EngineState]

# (trigger, sources, destination, what it means): the one table the code, the
# /gateway/state history, the README and the statecharts/ generator all read.
TRANSITIONS: list[tuple[str, list[str], str, str]] = [
    ("start", ["idle", "crashed"], "starting", "the head of the queue (or a load) needs an engine"),
    ("healthy", ["starting"], "ready", "the engine answered /health: requests are granted"),
    ("fail", ["starting"], "crashed", "the engine exited or was not healthy in time; it is killed"),
    ("abort", ["starting"], "stopping", "a start nobody needs any more (its waiters left, unload, shutdown)"),
    ("drain", ["ready"], "draining", "a swap, idle unload, reload or shutdown: no new grants"),
    ("resume", ["draining"], "ready", "the requests that needed a swap left before it happened"),
    ("drained", ["draining"], "stopping", "nothing in flight, or drain_timeout passed: stop it"),
    ("stopped", ["stopping"], "idle", "the engine process has exited"),
    ("died", ["ready", "draining"], "crashed", "the engine exited on its own, or froze and was killed"),
    ("reset", ["crashed"], "idle", "max_start_failures reached: that variant's waiters got 503"),
]

HISTORY_LENGTH = 200


@dataclass(frozen=True)
class TransitionRecord:
    model: str  # whose engine took the edge
    source: str
    dest: str
    trigger: str
    reason: str
    monotonic: float
    wall: float

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "from": self.source,
            "to": self.dest,
            "trigger": self.trigger,
            "reason": self.reason,
            "at": self.wall,
            "monotonic": self.monotonic,
        }


def machine_kwargs() -> dict[str, Any]:
    """Arguments that build this machine with any `transitions` machine class."""
    return {
        "states": STATES,
        "transitions": [
            {"trigger": trigger, "source": sources, "dest": dest} for trigger, sources, dest, _ in TRANSITIONS
        ],
        "initial": "idle",
        "auto_transitions": False,
    }


class EngineLifecycle:
    """One engine's machine: its current state and a bounded history. Every record is
    also handed to `on_record` (the supervisor's history of all engines)."""

    state: str  # set by the machine
    trigger: Callable[..., bool]  # set by the machine

    def __init__(self, model: str, on_record: Callable[[TransitionRecord], None] | None = None) -> None:
        self.model_name = model
        self.history: deque[TransitionRecord] = deque(maxlen=HISTORY_LENGTH)
        self._on_record = on_record
        self.machine = Machine(model=self, send_event=True, after_state_change="_record", **machine_kwargs())

    @property
    def current(self) -> EngineState:
        return EngineState(self.state)

    def fire(self, trigger: str, reason: str) -> None:
        """Take the named edge; an illegal one raises `transitions.MachineError`."""
        self.trigger(trigger, reason=reason)

    def _record(self, event: EventData) -> None:
        assert event.transition is not None and event.transition.dest is not None
        record = TransitionRecord(
            model=self.model_name,
            source=event.transition.source,
            dest=event.transition.dest,
            trigger=event.event.name,
            reason=str(event.kwargs.get("reason", "")),
            monotonic=time.monotonic(),
            wall=time.time(),
        )
        self.history.append(record)
        if self._on_record is not None:
            self._on_record(record)
