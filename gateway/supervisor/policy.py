"""The queue policy and the placement of engines: which waiting requests are granted now,
which engine starts next and which ones make room for it. Pure: no I/O, no clocks."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum

from gateway.config.schema import Model, Variant
from gateway.models import ModelSelector, Needs, RunningEngine, Selection
from gateway.models.selector import Outcome
from gateway.supervisor.machine import EngineState
from gateway.utils.sizes import human_bytes


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
    """One model's engine as the policy sees it."""

    model: str
    state: EngineState
    running: RunningEngine | None = None  # set while ready
    # Tokens of a shared (unified) KV cache not reserved by requests in flight, and its
    # slots not taken; None when every slot has a cache of its own. `idle`: nothing is in
    # flight on the engine.
    free_tokens: int | None = None
    free_slots: int | None = None
    idle: bool = True
    # Tokens finished requests may have left in idle engine slots (a unified cache keeps
    # them until a new task's prompt is processed there), and whether the gateway is
    # having the engine erase them now (no grants meanwhile).
    residue: int = 0
    clearing: bool = False
    memory: int = 0  # bytes it holds (or will, while starting)
    last_used: float = 0.0  # its last grant (monotonic)
    keep_loaded: bool = False
    local: bool = True  # a process here (False: an upstream, outside max_engines and the budget)

    @property
    def active(self) -> bool:
        return self.state not in (EngineState.IDLE, EngineState.CRASHED)

    @property
    def leaving(self) -> bool:
        return self.state in (EngineState.DRAINING, EngineState.STOPPING)


@dataclass(frozen=True)
class Limits:
    max_engines: int = 1
    memory_budget: int | None = None  # bytes; None: only max_engines limits


@dataclass(frozen=True)
class Start:
    """The engine the queue (or a load) needs next, and the engines that make room."""

    variant: Variant
    head: tuple[Waiting, Selection] | None  # the request it is for; None: a load
    evict: tuple[str, ...] = ()  # models whose engines are drained to make room
    now: bool = False  # it fits beside what runs: start it now


@dataclass
class Plan:
    grants: list[tuple[Waiting, Selection]] = field(default_factory=list)
    rejects: list[tuple[Waiting, Selection]] = field(default_factory=list)
    # Requests (and loads) no placement can ever serve (the budget, keep_loaded engines): why not.
    unfit: list[tuple[Waiting, str]] = field(default_factory=list)
    unfit_loads: list[tuple[Variant, str]] = field(default_factory=list)
    start: Start | None = None
    # Engines whose idle slots must be erased before the next grant fits.
    clear: set[str] = field(default_factory=set)


Footprint = Callable[[Variant], int]


def plan(
    waiting: Sequence[Waiting],
    engines: Mapping[str, EngineView],
    selector: ModelSelector,
    *,
    limits: Limits = Limits(),
    footprint: Footprint = lambda _: 0,
    backing_off: Collection[str] = (),
    loads: Sequence[Variant] = (),
) -> Plan:
    """What to do now, in arrival order:

    1. Each waiting request is selected against its model's engine. One no variant fits
       is rejected. One its ready engine serves is granted while that engine's shared KV
       cache has the tokens and a slot for each of its sequences (an idle engine always
       takes one, to count it at least); when it does not, it and every later request for
       that engine wait, so an engine serves its requests in arrival order and none waits
       inside the engine, unseen. When it would fit but for what finished requests left
       in idle engine slots, the engine erases them first (`clear`).
    2. A request whose model's engine is starting, draining or stopping waits for it.
    3. The first request that needs an engine started (its model runs none, or a variant
       too small) decides the next start: the first whose variant is not backing off
       after failures, if there is one. Starts are made only for it, which keeps arrival
       order fair and an A,B,A,B pattern from thrashing.
    4. With no such request, a load asked for ahead of traffic is the next start (one whose
       variant is not backing off first).
    5. `place` finds room for that start (see there).
    """
    result = Plan()
    free = {m: Room(e.free_tokens, e.free_slots, e.idle, e.residue) for m, e in engines.items()}
    blocked: set[str] = set()  # engines whose next request waits for room
    candidates: list[tuple[Waiting, Selection, bool]] = []  # (item, selection, is the head)
    waited = False  # an earlier request still waits
    # Requests of one model with the same needs are selected alike (a long queue is
    # mostly such repeats): selected once per plan.
    selections: dict[tuple[str, Needs], Selection] = {}
    for item in waiting:
        engine = engines.get(item.model.name)
        running = engine.running if engine is not None else None
        key = (item.model.name, item.needs)
        selection = selections.get(key)
        if selection is None:
            selection = selections[key] = selector.select(item.needs, item.model, running)
        if selection.outcome is Outcome.REJECTED:
            result.rejects.append((item, selection))
            continue
        if selection.outcome is Outcome.REUSED:
            assert running is not None
            blocked_before = item.model.name in blocked or engine is None or engine.clearing
            fit = Fit.BLOCKED if blocked_before else _take(free, item, running)
            if item.model.name not in blocked and fit is Fit.GRANTED:
                result.grants.append((item, selection))
                continue
            if item.model.name not in blocked and fit is Fit.AFTER_CLEARING:
                result.clear.add(item.model.name)
            blocked.add(item.model.name)
        elif engine is None or not engine.active or engine.state is EngineState.READY:
            candidates.append((item, selection, not waited))
            if selection.variant is not None and selection.variant.key in backing_off:
                continue  # it waits for its back-off: the next one may be the head
        waited = True
    head = _first_not_backing_off(candidates, backing_off)
    if head is not None:
        item, selection, first = head
        assert selection.variant is not None
        placement = place(selection.variant, engines, limits, footprint, disrupt=first, grants=result.grants)
        if isinstance(placement, str):
            result.unfit.append((item, placement))
        elif placement is not None:
            result.start = replace(placement, head=(item, selection))
        return result
    # Loads whose variant may start now first: one backing off does not hold the others up.
    for variant in sorted(loads, key=lambda v: v.key in backing_off):
        engine = engines.get(variant.model)
        if engine is not None and engine.active:
            running = engine.running
            if running is None or running.variant == variant:
                continue  # under way, or loaded: nothing to start
        placement = place(variant, engines, limits, footprint, disrupt=not waiting, grants=result.grants)
        if isinstance(placement, str):
            result.unfit_loads.append((variant, placement))
        elif placement is not None and result.start is None:
            result.start = placement
    return result


def place(
    variant: Variant,
    engines: Mapping[str, EngineView],
    limits: Limits,
    footprint: Footprint,
    *,
    disrupt: bool,
    grants: Sequence[tuple[Waiting, Selection]] = (),
) -> Start | str | None:
    """Room for `variant`'s engine: a Start, None to wait, or why it can never fit.

    1. Its model's own engine, when one runs, always goes (one engine per model): the
       model changes variant as a swap does.
    2. It never fits, even with every engine but the keep_loaded ones gone: why not.
    3. It fits beside what runs (engines and bytes): start now. Upstreams (remote
       engines) take neither an engine place nor memory, and always fit.
    4. Engines already leaving free their room first; then idle engines (nothing in
       flight, nothing granted now), least recently used first, never a keep_loaded one.
    5. Only for the head of the queue (`disrupt`): busy engines too, least recently used
       first; they drain (requests in flight finish within drain_timeout) and then stop.
    6. Not enough without disrupting: wait. Enough: drain those chosen; the start comes
       once they have stopped.
    """
    needed = footprint(variant)
    active = {m: e for m, e in engines.items() if e.active}
    granted = {item.model.name for item, _ in grants}

    def fits(removed: Collection[str]) -> bool:
        if not variant.engine.local:
            return True  # an upstream takes no engine place and no memory here
        staying = [e for m, e in active.items() if m not in removed and e.local]
        # Alone it always fits the budget: the config's check proved its estimate does;
        # a measurement above it is what this machine ran before.
        within_memory = (
            limits.memory_budget is None
            or not staying
            or sum(e.memory for e in staying) + needed <= limits.memory_budget
        )
        return len(staying) + 1 <= limits.max_engines and within_memory

    own = active.get(variant.model)
    if own is not None and not disrupt and not _idle(own, granted):
        return None  # replacing a busy engine of its model is for the head of the queue
    removed = [variant.model] if own is not None else []
    evictable = [e for m, e in active.items() if not e.keep_loaded or m == variant.model]
    if not fits([e.model for e in evictable]):
        return _never_fits(variant, needed, active, limits)
    if not removed and fits(()):
        return Start(variant, None, now=True)
    by_age = sorted((e for e in active.values() if e.model not in removed), key=lambda e: e.last_used)
    leaving = [e.model for e in by_age if e.leaving]
    idle = [e.model for e in by_age if _idle(e, granted)]
    busy = [e.model for e in by_age if e.state is EngineState.READY and not e.keep_loaded]
    for model in (*leaving, *idle, *(busy if disrupt else ())):
        if fits(removed):
            break
        if model not in removed:
            removed.append(model)
    if not fits(removed):
        return None
    return Start(variant, None, evict=tuple(m for m in removed if m not in leaving))


def excess(engines: Mapping[str, EngineView], limits: Limits) -> tuple[str, ...]:
    """Engines to stop because the running ones exceed the limits (a reload lowered them):
    idle ones first, then busy ones, least recently used first, never a keep_loaded one.
    Engines already leaving count as gone, upstreams do not count; one engine alone is
    always within the budget."""
    staying = sorted(
        (e for e in engines.values() if e.active and not e.leaving and e.local), key=lambda e: e.last_used
    )

    def within(kept: list[EngineView]) -> bool:
        memory = sum(e.memory for e in kept)
        budget = limits.memory_budget
        return len(kept) <= limits.max_engines and (budget is None or len(kept) <= 1 or memory <= budget)

    chosen: list[str] = []
    for candidates in (
        [e for e in staying if _idle(e, ())],
        [e for e in staying if e.state is EngineState.READY and not e.keep_loaded],
    ):
        for engine in candidates:
            if within([e for e in staying if e.model not in chosen]):
                return tuple(chosen)
            if engine.model not in chosen:
                chosen.append(engine.model)
    return tuple(chosen)


def _idle(engine: EngineView, granted: Collection[str]) -> bool:
    return (
        engine.state is EngineState.READY
        and engine.idle
        and not engine.keep_loaded
        and engine.model not in granted
    )


def _never_fits(variant: Variant, needed: int, active: Mapping[str, EngineView], limits: Limits) -> str:
    kept = [e for m, e in active.items() if e.keep_loaded and m != variant.model]
    held = ", ".join(f"{e.model} {human_bytes(e.memory)}" for e in kept) or "none"
    budget = limits.memory_budget
    if kept and budget is not None and needed + sum(e.memory for e in kept) > budget:
        return (
            f"{variant.key} needs {human_bytes(needed)}, which does not fit the memory budget of "
            f"{human_bytes(budget)} beside the keep_loaded engines ({held})"
        )
    return (
        f"{variant.key} cannot start: max_engines is {limits.max_engines} and the keep_loaded "
        f"engines ({held}) are never evicted"
    )


@dataclass(frozen=True)
class Room:
    """What an engine has left while the plan grants on it."""

    tokens: int | None
    slots: int | None
    idle: bool
    residue: int


class Fit(Enum):
    GRANTED = "granted"
    AFTER_CLEARING = "after clearing"  # it fits once idle slots are erased
    BLOCKED = "blocked"


def _take(free: dict[str, Room], item: Waiting, running: RunningEngine) -> Fit:
    """Grant `item` on its engine if it has room; count what it takes.

    1. No room for its slots, or for its tokens even with idle slots erased: blocked
       (unless nothing is in flight: an idle engine always takes one).
    2. Room only once idle slots are erased: after clearing.
    3. Else granted.
    """
    room = free[item.model.name]
    reservation, use = item.reservation(running), item.slot_use(running)
    no_slot = room.slots is not None and use > room.slots
    no_tokens = room.tokens is not None and reservation > room.tokens
    if (no_slot or no_tokens) and not room.idle:
        return Fit.BLOCKED
    if room.tokens is not None and reservation > room.tokens - room.residue and not room.idle:
        return Fit.AFTER_CLEARING
    free[item.model.name] = Room(
        None if room.tokens is None else room.tokens - reservation,
        None if room.slots is None else room.slots - use,
        False,
        room.residue,
    )
    return Fit.GRANTED


def _first_not_backing_off(
    candidates: Sequence[tuple[Waiting, Selection, bool]], backing_off: Collection[str]
) -> tuple[Waiting, Selection, bool] | None:
    """The first candidate whose variant may start now, else the first: a failing
    variant does not hold up the requests another variant serves."""
    for candidate in candidates:
        variant = candidate[1].variant
        if variant is not None and variant.key not in backing_off:
            return candidate
    return candidates[0] if candidates else None
