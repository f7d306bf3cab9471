"""The events the supervisor consumes: from handlers, from effects, from timers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.config.schema import GatewayConfig, Variant
from gateway.models import PromptShape

if TYPE_CHECKING:
    from gateway.engine.manager import EngineInstance, StartFailed
    from gateway.supervisor.requests import PendingRequest


@dataclass(frozen=True)
class RequestArrived:
    pending: PendingRequest


@dataclass(frozen=True)
class RequestCancelled:
    pending: PendingRequest


@dataclass(frozen=True)
class LeaseReleased:
    lease: int
    requeue_reason: str | None
    served: bool
    abandoned: bool = False


@dataclass(frozen=True)
class TokensCounted:
    lease: int
    model: str
    shape: PromptShape
    tokens: int
    fits: asyncio.Future[bool]


@dataclass(frozen=True)
class StartFinished:
    model: str
    variant: Variant
    instance: EngineInstance | None
    error: StartFailed | None


@dataclass(frozen=True)
class StopFinished:
    instance: EngineInstance
    code: int


@dataclass(frozen=True)
class EngineExited:
    instance: EngineInstance
    code: int


@dataclass(frozen=True)
class EngineProbed:
    instance: EngineInstance
    problem: str | None  # None: it answered /health in time


@dataclass(frozen=True)
class SlotsSeen:
    instance: EngineInstance
    busy: frozenset[int] | None  # the tasks its slots process; None: /slots did not answer
    look: int  # which look this answers (ghosts made after it was sent ignore it)


@dataclass(frozen=True)
class IdleSlotsCleared:
    instance: EngineInstance
    cleared: bool  # False: the engine did not answer (it is probed)


@dataclass(frozen=True)
class TimerFired:
    model: str | None  # the engine's; None for the supervisor's own ("retry")
    name: str  # "idle", "drain", "probe", "slots" (an engine's), or "retry"
    instance: EngineInstance | None  # the engine it was armed for


@dataclass(frozen=True)
class UnloadRequested:
    model: str | None  # None: every engine
    done: asyncio.Future[None]


@dataclass(frozen=True)
class ConfigReloaded:
    config: GatewayConfig


@dataclass(frozen=True)
class LoadRequested:
    variant: Variant
    done: asyncio.Future[None]


@dataclass(frozen=True)
class ShutdownRequested:
    done: asyncio.Future[None]


Event = (
    RequestArrived
    | RequestCancelled
    | LeaseReleased
    | TokensCounted
    | StartFinished
    | StopFinished
    | EngineExited
    | EngineProbed
    | SlotsSeen
    | IdleSlotsCleared
    | TimerFired
    | UnloadRequested
    | ConfigReloaded
    | LoadRequested
    | ShutdownRequested
)
