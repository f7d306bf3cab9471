"""The queue policy: which waiting requests are granted now and what runs next. Pure."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace

from gateway.config.schema import Model
from gateway.models import ModelSelector, Needs, RunningEngine, Selection
from gateway.models.selector import Outcome


@dataclass(frozen=True)
class Waiting:
    """A queued request as the policy sees it."""

    seq: int  # arrival order
    model: Model
    needs: Needs
    # A proven upper bound of its prompt tokens on the running engine, when its needs are
    # an estimate: granted, it is counted only afterwards, so it reserves the bound.
    bound: int = 0

    def reservation(self, running: RunningEngine) -> int:
        """What it takes of the running engine's shared KV cache if granted."""
        needs = replace(self.needs, prompt_tokens=max(self.bound, self.needs.prompt_tokens))
        return running.room.reservation(needs)

    def slot_use(self, running: RunningEngine) -> int:
        return running.room.slot_use(self.needs)


@dataclass(frozen=True)
class EngineView:
    state: str  # the machine's state
    running: RunningEngine | None  # set while ready
    # Tokens of a shared (unified) KV cache not reserved by requests in flight, and its
    # slots not taken; None when every slot has a cache of its own. `idle`: nothing is in
    # flight on the engine.
    free_tokens: int | None = None
    free_slots: int | None = None
    idle: bool = True
    # Variants (keys) that failed and may not start again yet.
    backing_off: Collection[str] = ()


@dataclass
class Plan:
    grants: list[tuple[Waiting, Selection]] = field(default_factory=list)
    rejects: list[tuple[Waiting, Selection]] = field(default_factory=list)
    # What the head of the queue needs once nothing else can be granted: a swap target.
    next: tuple[Waiting, Selection] | None = None


def plan(waiting: Sequence[Waiting], engine: EngineView, selector: ModelSelector) -> Plan:
    """Grant every waiting request the ready engine serves, in arrival order; reject what
    no variant fits; the first of the rest decides the next engine (the first whose
    variant is not backing off after failures, if there is one: a failing variant does
    not hold up the requests another variant serves).

    Requests for other engines wait even when later ones could be served now: a swap is
    only ever made for the head of the queue, which keeps arrival order fair and an
    A,B,A,B pattern from swapping on every request. With a shared KV cache a request is
    granted only while the tokens it needs and a slot for each of its sequences are free,
    so concurrent requests never run the engine out of context and none waits inside the
    engine, unseen; an idle engine always takes one (to count it, at least).
    """
    result = Plan()
    running = engine.running if engine.state == "ready" else None
    free, free_slots, idle = engine.free_tokens, engine.free_slots, engine.idle
    for item in waiting:
        selection = selector.select(item.needs, item.model, running)
        if selection.outcome is Outcome.REJECTED:
            result.rejects.append((item, selection))
        elif selection.outcome is Outcome.REUSED:
            assert running is not None
            reservation, slots = item.reservation(running), item.slot_use(running)
            full = (free is not None and reservation > free) or (
                free_slots is not None and slots > free_slots
            )
            if full and not idle:
                break  # waits for the requests in flight to end; later ones keep their turn
            result.grants.append((item, selection))
            idle = False
            if free is not None:
                free -= reservation
            if free_slots is not None:
                free_slots -= slots
        elif result.next is None or (
            _backing_off(result.next[1], engine) and not _backing_off(selection, engine)
        ):
            result.next = (item, selection)
    return result


def _backing_off(selection: Selection, engine: EngineView) -> bool:
    return selection.variant is not None and selection.variant.key in engine.backing_off
