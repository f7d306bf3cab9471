"""The queue policy: which waiting requests are granted now and what runs next. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.config.schema import Model
from gateway.models import ModelSelector, Needs, RunningEngine, Selection
from gateway.models.selector import Outcome


@dataclass(frozen=True)
class Waiting:
    """A queued request as the policy sees it."""

    seq: int  # arrival order
    model: Model
    needs: Needs
    # Context it takes on a shared KV cache if granted: its needs, or more when they are
    # an estimate that a byte bound exceeds.
    tokens: int = 0

    @property
    def reservation(self) -> int:
        return max(self.tokens, self.needs.total)


@dataclass(frozen=True)
class EngineView:
    state: str  # the machine's state
    running: RunningEngine | None  # set while ready
    # Tokens of a shared (unified) KV cache not reserved by requests in flight; None when
    # every slot has a cache of its own. `idle`: nothing is in flight on the engine.
    free_tokens: int | None = None
    idle: bool = True


@dataclass
class Plan:
    grants: list[tuple[Waiting, Selection]] = field(default_factory=list)
    rejects: list[tuple[Waiting, Selection]] = field(default_factory=list)
    # What the head of the queue needs once nothing else can be granted: a swap target.
    next: tuple[Waiting, Selection] | None = None


def plan(waiting: Sequence[Waiting], engine: EngineView, selector: ModelSelector) -> Plan:
    """Grant every waiting request the ready engine serves, in arrival order; reject what
    no variant fits; the first of the rest decides the next engine.

    Requests for other engines wait even when later ones could be served now: a swap is
    only ever made for the head of the queue, which keeps arrival order fair and an
    A,B,A,B pattern from swapping on every request. With a shared KV cache a request is
    granted only while the tokens it needs are free, so concurrent requests never run
    the engine out of context; an idle engine always takes one (to count it, at least).
    """
    result = Plan()
    running = engine.running if engine.state == "ready" else None
    free, idle = engine.free_tokens, engine.idle
    for item in waiting:
        selection = selector.select(item.needs, item.model, running)
        if selection.outcome is Outcome.REJECTED:
            result.rejects.append((item, selection))
        elif selection.outcome is Outcome.REUSED:
            if free is not None and item.reservation > free and not idle:
                break  # waits for the requests in flight to end; later ones keep their turn
            result.grants.append((item, selection))
            idle = False
            if free is not None:
                free -= item.reservation
        elif result.next is None:
            result.next = (item, selection)
    return result
