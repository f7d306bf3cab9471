"""The supervisor: one asyncio task that owns the queue, the leases and every engine.

Handlers and effect tasks never touch that state; they post events to the supervisor's
inbox and await futures. After every event the supervisor asks the pure policy what to
do and turns the answer into machine triggers and effects (start, stop, timers) whose
results come back as events. One task, so no locks.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from gateway.config.schema import GatewayConfig, Model, Variant
from gateway.engine.adapter import StartFailed
from gateway.engine.manager import EngineInstance
from gateway.errors import EngineFailed, EngineTimeout, GatewayError, Unavailable
from gateway.models import (
    ModelSelector,
    Needs,
    PromptShape,
    Room,
    RunningEngine,
    Selection,
    TokenEstimator,
    token_floor,
)
from gateway.models.selector import Outcome
from gateway.supervisor import events as ev
from gateway.supervisor.effects import Effects
from gateway.supervisor.machine import HISTORY_LENGTH, EngineState, TransitionRecord
from gateway.supervisor.policy import EngineView, Limits, Plan, Start, Waiting, excess, plan
from gateway.supervisor.requests import Grant, Lease, PendingRequest
from gateway.supervisor.scheduler import Scheduler, fail
from gateway.supervisor.slot import Draining, EngineSlot, Ghost, Memory, Starting, Stopping, Timer
from gateway.utils.live import LiveEvents, LiveKind
from gateway.utils.metrics import Metrics
from gateway.utils.sizes import human_bytes

log = logging.getLogger("gateway.supervisor")

FAULTS_REMEMBERED = 100  # distinct causes whose traceback was logged; then one line each
BACKOFF_BASE = 0.25  # seconds before the first restart after a failure; doubles, bounded
BACKOFF_MAX = 8.0
# Seconds between health probes of an engine with requests in flight: one that stops
# answering (SIGSTOP, a driver fault, swapping) would otherwise hold them forever.
PROBE_INTERVAL = 1.0
EVENTS_PER_ROUND = 256  # events handled at most before the supervisor decides again
# Seconds between looks at an engine's /slots while abandoned requests may still run.
SLOTS_LOOK_INTERVAL = 0.02


@dataclass
class Load:
    """A load asked for ahead of traffic: the variant, and who waits for it to be ready."""

    variant: Variant
    waiters: list[asyncio.Future[None]]

    def answer(self, error: GatewayError | None = None) -> None:
        for done in self.waiters:
            if error is None and not done.done():
                done.set_result(None)
            else:
                fail(done, error or Unavailable("load ended"))


@dataclass
class Unload:
    """An unload: the engines that ran when it was asked for, each with its count of stops
    then; it is answered once each has stopped since (engines started later for waiting
    requests are not its business)."""

    stops: dict[EngineSlot, int]
    done: asyncio.Future[None]

    def finished(self) -> bool:
        return all(slot.stops > count for slot, count in self.stops.items())


class Supervisor:
    """The one task that decides every start, stop and grant."""

    def __init__(
        self,
        config: GatewayConfig,
        effects: Effects,
        metrics: Metrics | None = None,
        live: LiveEvents | None = None,
    ) -> None:
        self.config = config
        self._effects = effects
        self.metrics = metrics or Metrics()
        self.live = live or LiveEvents()  # what changes, for /gateway/events
        self.counters: Counter[str] = Counter()
        self.estimator = TokenEstimator()
        self.scheduler = Scheduler(self.metrics, self.counters, self.live)
        self.slots: dict[str, EngineSlot] = {}  # by model name; kept after a stop (its history)
        self.history: deque[TransitionRecord] = deque(maxlen=HISTORY_LENGTH)  # of every engine
        self._inbox: asyncio.Queue[ev.Event] = asyncio.Queue()
        self._handling = False
        self._quiet: list[asyncio.Future[None]] = []  # quiesce() callers
        self._failures: Counter[str] = Counter()  # failed starts or crashes in a row, per variant
        self._retry_at: dict[str, float] = {}  # per variant key: no restart before (monotonic)
        self._retry: asyncio.TimerHandle | None = None
        self._wanted: dict[str, Load] = {}  # loads asked for, by model
        self._unloading: list[Unload] = []
        self._room_made: dict[str, tuple[float, tuple[str, ...], str]] = {}  # swaps under way
        self._measured: dict[Variant, int] = {}  # the most an engine of each variant took, in bytes
        self._unreachable: dict[str, str] = {}  # remote models whose last probe failed: why
        # Each queued request's view for the policy, by its seq, and what it was made from.
        self._waiting_kept: dict[int, tuple[tuple[int | None, str, int], EngineInstance | None, Waiting]] = {}
        self._shutdown: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._faults_seen: set[str] = set()  # causes whose traceback was logged
        self.last_engine_lines: list[str] = []  # of the last engine that stopped or failed
        self._queue_shown: dict[str, Any] = {}  # the queue as last published

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="supervisor")

    async def shutdown(self) -> None:
        """Refuse new work, let in-flight requests finish (bounded), stop every engine.

        The task keeps running afterwards, so that a request arriving late (a requeue
        after a cut-off, say) still gets its 503; `close` ends it.
        """
        done = asyncio.get_running_loop().create_future()
        self._post(ev.ShutdownRequested(done))
        await done

    @property
    def started(self) -> bool:
        return self._task is not None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        tasks = [task for slot in self.slots.values() for task in slot.tasks()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def quiesce(self) -> None:
        """Return once the supervisor has handled every event posted so far and acted on
        it (what its effects post later is not waited for)."""
        if self._inbox.empty() and not self._handling:
            return
        done = asyncio.get_running_loop().create_future()
        self._quiet.append(done)
        await done

    # --- the API handlers use ----------------------------------------------------------------

    async def acquire(self, pending: PendingRequest) -> Grant:
        """Queue the request and wait for a lease (or the error that ends its wait)."""
        pending.future = asyncio.get_running_loop().create_future()
        self._post(ev.RequestArrived(pending))
        try:
            return await asyncio.shield(pending.future)
        except asyncio.CancelledError:
            if not pending.future.done():
                pending.future.cancel()
                self._post(ev.RequestCancelled(pending))
            elif not pending.future.cancelled() and pending.future.exception() is None:
                self.release(pending.future.result())  # granted just as it was cancelled
            raise

    def release(
        self, grant: Grant, requeue_reason: str | None = None, served: bool = False, abandoned: bool = False
    ) -> None:
        """End a lease, exactly once per grant. With a reason, the holder will `acquire`
        again for the same request, which keeps its place in the queue. `abandoned`: the
        engine got the request and may still be working on it (its client left)."""
        self._post(ev.LeaseReleased(grant.lease, requeue_reason, served, abandoned))

    def confirm(self, grant: Grant, shape: PromptShape, tokens: int) -> asyncio.Future[bool]:
        """An exact count on the granted engine: it becomes the lease's reservation (and
        teaches the model's tokens per byte). Resolves to whether the requests in flight
        still fit the engine's shared KV cache with it."""
        fits = asyncio.get_running_loop().create_future()
        self._post(ev.TokensCounted(grant.lease, grant.instance.model.name, shape, tokens, fits))
        return fits

    def unload(self, model: str | None = None) -> asyncio.Future[None]:
        """Stop one model's engine, or all (after a drain); resolves when it is down."""
        done = asyncio.get_running_loop().create_future()
        self._post(ev.UnloadRequested(model, done))
        return done

    def reload(self, config: GatewayConfig) -> None:
        self._post(ev.ConfigReloaded(config))

    def load(self, variant: Variant) -> asyncio.Future[None]:
        """Start `variant` ahead of traffic (queued requests go first); resolves when ready."""
        done = asyncio.get_running_loop().create_future()
        done.add_done_callback(_retrieved)  # its caller may have left (the load goes on)
        self._post(ev.LoadRequested(variant, done))
        return done

    def capacity(self, variant: Variant) -> Room:
        model = self.config.resolve(variant.model)
        if model is None or model.name != variant.model:  # removed by a reload meanwhile
            return Room(variant.context)
        return self._effects.capacity(variant, model)

    def footprint(self, variant: Variant) -> Memory:
        """The variant's memory: the estimate, and what an engine of it measured."""
        measured = self._measured.get(variant)
        if variant.memory is not None:
            return Memory(variant.memory, measured, declared=True)
        return Memory(self._effects.footprint(variant) or 0, measured)

    # --- the run loop --------------------------------------------------------------------------

    def _post(self, event: ev.Event) -> None:
        self._inbox.put_nowait(event)

    async def _run(self) -> None:
        while True:
            # Every event already waiting is handled before one reconcile: deciding looks
            # at the whole queue, so a burst of arrivals costs one look, not one each.
            events = [await self._inbox.get()]
            while len(events) < EVENTS_PER_ROUND and not self._inbox.empty():
                events.append(self._inbox.get_nowait())
            self._handling = True
            for event in events:
                try:
                    self._handle(event)
                except Exception as exc:
                    self._event_failed(event, exc)
            self._reconcile_safely()
            self._publish_queue()
            self._handling = False
            if self._inbox.empty():
                for done in self._quiet:
                    if not done.done():
                        done.set_result(None)
                self._quiet.clear()

    def _handle(self, event: ev.Event) -> None:
        match event:
            case ev.RequestArrived(pending):
                self._arrive(pending)
            case ev.RequestCancelled(pending):
                self.scheduler.cancel(pending)
            case ev.LeaseReleased(lease, requeue, served, abandoned):
                self._release(lease, requeue, served, abandoned)
            case ev.SlotsSeen(instance, busy, look):
                self._slots_seen(instance, busy, look)
            case ev.IdleSlotsCleared(instance, cleared):
                self._idle_slots_cleared(instance, cleared)
            case ev.TokensCounted(lease_id, model, shape, tokens, fits):
                self.estimator.observe(model, shape, tokens)
                self._count("tokens_counted", model, tokens)
                fits.set_result(self._recount(lease_id, tokens))
            case ev.StartFinished(model, variant, instance, error):
                self._start_finished(self.slots[model], variant, instance, error)
            case ev.StopFinished(instance, code):
                self._stop_finished(instance, code)
            case ev.EngineExited(instance, code):
                self._engine_exited(instance, code)
            case ev.EngineProbed(instance, problem):
                self._engine_probed(instance, problem)
            case ev.TimerFired(model, name, instance):
                self._timer_fired(model, name, instance)
            case ev.UnloadRequested(model, done):
                self._unload(model, done)
            case ev.ConfigReloaded(config):
                self._reload(config)
            case ev.LoadRequested(variant, done):
                self._load(variant, done)
            case ev.ShutdownRequested(done):
                self._begin_shutdown(done)

    # --- faults: one bad request or model never stalls the others -----------------------------

    def _event_failed(self, event: ev.Event, exc: Exception) -> None:
        """Handling `event` raised: whoever waits on it gets a 500 naming the cause."""
        error = self._fault(f"handling {type(event).__name__}", exc)
        match event:
            case ev.RequestArrived(pending):
                self.scheduler.answer(pending, error)
            case ev.TokensCounted(fits=done) | ev.UnloadRequested(done=done) | ev.LoadRequested(done=done):
                fail(done, error)

    def _reconcile_safely(self) -> None:
        """Reconcile; when deciding raises, isolate the requests it raises for.

        1. Reconcile as usual.
        2. On an exception, plan each waiting request alone: those whose planning raises
           get a 500 naming the cause and leave the queue.
        3. Reconcile again for the rest; if that still raises, the fault is not any one
           request's: every waiting request gets the 500 rather than waiting forever.
        """
        try:
            self._reconcile()
            return
        except Exception as exc:
            self._fault("deciding", exc)
        try:
            for pending in list(self.scheduler.queue):
                try:
                    self._plan([self._as_waiting(pending)])
                except Exception as exc:
                    error = self._fault(f"deciding for request {pending.request_id}", exc)
                    self.scheduler.answer(pending, error)
            self._reconcile()
        except Exception as exc:
            self.scheduler.fail_waiters(self._fault("deciding", exc))

    def _fault(self, doing: str, exc: Exception) -> GatewayError:
        """Log a fault (its traceback once per distinct cause) and make the error to answer."""
        cause = f"{type(exc).__name__}: {exc}"
        self.counters["supervisor_faults"] += 1
        if cause in self._faults_seen or len(self._faults_seen) >= FAULTS_REMEMBERED:
            log.error("supervisor fault while %s: %s (traceback logged before)", doing, cause)
        else:
            self._faults_seen.add(cause)
            log.error("supervisor fault while %s: %s", doing, cause, exc_info=exc)
        return GatewayError(f"internal error in the gateway's scheduler while {doing}: {cause}")

    # --- requests ------------------------------------------------------------------------------

    def _arrive(self, pending: PendingRequest) -> None:
        assert pending.future is not None
        if pending.future.done():
            return  # cancelled before it got here
        if self._shutdown is not None:
            pending.future.set_exception(_shutting_down())
        elif pending.model.name in self._unreachable:
            self._count("rejected_unreachable", pending.model.name)
            pending.future.set_exception(self._unreachable_error(pending.model.name))
        elif self.scheduler.enqueue(pending, self.config.server.queue_limit):
            self._refresh(pending)
            hopeless = self._hopeless(pending)
            if hopeless is not None:
                self._reject(pending, hopeless)

    def _hopeless(self, pending: PendingRequest) -> Selection | None:
        """The rejection of a request too large for every variant by a lower bound of its
        tokens alone: nothing is started, or swapped to, just to count it."""
        longest = [self._effects.longest_token(v) for v in pending.model.variants]
        if pending.exact_tokens is not None or None in longest:
            return None
        floor = token_floor(pending.shape, max(n for n in longest if n is not None))
        needs = Needs(floor, pending.reserve, "floor", pending.sequences)
        selection = self._selector().select(needs, pending.model, None)
        return selection if selection.outcome is Outcome.REJECTED else None

    def _reject(self, pending: PendingRequest, selection: Selection) -> None:
        self.scheduler.reject(pending, selection, self._selector().largest_capacity(pending.model))

    def _release(self, lease_id: int, requeue_reason: str | None, served: bool, abandoned: bool) -> None:
        lease = self.scheduler.release(lease_id, requeue_reason, served)
        if lease is None:
            return
        slot = self.slots.get(lease.instance.model.name)
        # What it leaves on the engine matters while that still serves (no look at /slots
        # may race a stop's SIGTERM: the requests a drain timeout cut off end after it began).
        serving = slot is not None and slot.instance is lease.instance and slot.state in _RUNNING
        if slot is not None and serving and lease.instance.kv_budget is not None:
            if abandoned:
                slot.ghosts.append(Ghost(lease, look=slot.looks + 1))
                slot.look_at_slots(self._effects)  # the probe armed at its grant goes on meanwhile
            else:
                slot.leave_residue(lease.tokens, lease.instance.slots)
        if served:
            self._failures.pop(lease.instance.variant.key, None)  # the variant works again

    def _recount(self, lease_id: int, tokens: int) -> bool:
        """The lease now reserves its exact needs; do all on its engine still fit?"""
        lease = self.scheduler.leases.get(lease_id)
        if lease is None:
            return True
        running = _running(lease.instance)
        lease.tokens = running.room.reservation(lease.pending.needs(tokens))
        budget = lease.instance.kv_budget
        return budget is None or sum(held.tokens for held in self._held(lease.instance)) <= budget

    def _held(self, instance: EngineInstance) -> list[Lease]:
        """What holds room on an engine: its leases and its ghosts."""
        slot = self.slots.get(instance.model.name)
        ghosts = [g.lease for g in slot.ghosts] if slot is not None and slot.instance is instance else []
        return [*self.scheduler.on(instance), *ghosts]

    def _at_work(self, slot: EngineSlot) -> bool:
        """Requests in flight on the engine, or abandoned ones it has not let go of yet:
        llama-server ignores SIGTERM while it still runs a request, so a stop waits."""
        instance = slot.instance
        return instance is not None and bool(self._held(instance))

    # --- deciding ------------------------------------------------------------------------------

    def _reconcile(self) -> None:
        """After every event, in this order:

        1. Forget waiters that have their answer; answer unloads whose engines are down.
        2. Shutting down: wind every engine down; answer the shutdown once all are down.
        3. Cut short starts nobody waits for any more.
        4. Call off drains the queue asked for and no longer needs.
        5. Engines over the limits (a reload lowered them) are drained.
        6. Plan: answer what can never be served (again, until nothing is answered),
           grant, then evict or start for the head of the queue.
        7. Stop drained engines with nothing at work; arm idle timers.
        """
        self.scheduler.prune()
        self._answer_unloads()
        if self._shutdown is not None:
            self._continue_shutdown()
            return
        for slot in self.slots.values():
            if isinstance(slot.phase, Starting) and not self._wants(slot):
                log.info("start of %s cut short: nobody waits for it any more", slot.phase.variant.key)
                slot.abort("nobody waits for it any more")
        for slot in self.slots.values():
            if isinstance(slot.phase, Draining) and slot.phase.resumable and self._drain_unneeded(slot):
                slot.resume("the requests that needed the drain are gone")
        for model in excess(self._views(), self._limits()):
            self._drain(self.slots[model], "over max_engines or memory_budget after a config reload", False)
        self._apply(self._answered_plan())
        self._settle()

    def _answered_plan(self) -> Plan:
        """The plan once what can never be served has its answer (again, until nothing is)."""
        decision = self._plan(self._waiting())
        while decision.rejects or decision.unfit or decision.unfit_loads:
            self._answer(decision)
            decision = self._plan(self._waiting())
        return decision

    def _plan(self, waiting: list[Waiting], views: dict[str, EngineView] | None = None) -> Plan:
        now = time.monotonic()
        return plan(
            waiting,
            views if views is not None else self._views(),
            self._selector(),
            limits=self._limits(),
            footprint=lambda variant: self.footprint(variant).reserved,
            backing_off={key for key, at in self._retry_at.items() if at > now},
            loads=[load.variant for load in self._wanted.values()],
        )

    def _limits(self) -> Limits:
        return Limits(self.config.server.max_engines, self.config.server.memory_budget)

    def _answer(self, decision: Plan) -> None:
        for item, selection in decision.rejects:
            self._reject(self.scheduler.by_seq(item.seq), selection)
        for item, why in decision.unfit:
            self._count("rejected_no_room", item.model.name)
            self.scheduler.answer(self.scheduler.by_seq(item.seq), Unavailable(why))
        for variant, why in decision.unfit_loads:
            self._wanted.pop(variant.model).answer(Unavailable(why))

    def _apply(self, decision: Plan) -> None:
        """Grants first (on ready engines), then the start the plan asks for, or the
        evictions that make room for it."""
        self._grant(decision)
        if decision.start is not None:
            self._start_or_make_room(decision.start)

    def _grant(self, decision: Plan) -> None:
        """The plan's grants on ready engines, and the erases of idle slots a grant needs."""
        for item, selection in decision.grants:
            pending = self.scheduler.by_seq(item.seq)
            slot = self.slots[pending.model.name]
            instance = slot.ready
            assert instance is not None
            running = _running(instance)
            self.scheduler.grant(
                pending, selection, instance, item.reservation(running), item.slot_use(running)
            )
            slot.touch()
            slot.cancel(Timer.IDLE)
            self._watch_health(slot)
        for model in decision.clear:
            slot = self.slots[model]
            if slot.clearing is None:
                self._count("idle_slot_clears", model)
                log.info("erase the idle slots of %s: they may keep %d tokens", model, sum(slot.residue))
            slot.clear_idle_slots(self._effects)

    def _start_or_make_room(self, start: Start) -> None:
        variant = start.variant
        pending = self.scheduler.by_seq(start.head[0].seq) if start.head else None
        why = f"request {pending.request_id}" if pending is not None else "load requested"
        if pending is not None and start.head is not None:
            self.scheduler.log_selection(pending, start.head[1])
        if start.now:
            self._start(pending.model if pending is not None else self._model(variant.model), variant, why)
            return
        if not start.evict:
            return  # room is being made already
        self._count("swaps", variant.model)
        self._room_made[variant.model] = (time.monotonic(), start.evict, f"swap to {variant.key} for {why}")
        for model in start.evict:
            slot = self.slots[model]
            busy = self._at_work(slot)
            if model != variant.model:
                self.metrics.evictions.labels(model, "busy" if busy else "idle").inc()
                self.counters["evictions"] += 1
                self.live.publish(
                    LiveKind.EVICTION,
                    {
                        "model": model,
                        "for": variant.key,
                        "busy": busy,
                        "frees": slot.memory.reserved if slot.memory else 0,
                    },
                )
                log.info(
                    "evict %s (%s, least recently used) to start %s for %s: frees %s",
                    slot.variant.key if slot.variant else model,
                    "busy: drained first" if busy else "idle",
                    variant.key,
                    why,
                    human_bytes(slot.memory.reserved if slot.memory else 0),
                )
            self._drain(slot, f"swap to {variant.key} for {why}", resumable=True)

    def _start(self, model: Model, variant: Variant, why: str) -> None:
        """(`model` is the request's: one a reload removed still serves what it accepted.)"""
        delay = self._retry_at.get(variant.key, 0.0) - time.monotonic()
        if delay > 0:
            self._arm_retry(delay)  # backoff after failures; reconcile again then
            return
        slot = self._slot(variant.model)
        slot.memory = self.footprint(variant)
        self._count("starts", variant.model)
        slot.start(model, variant, self._effects, f"{why} needs {variant.key}")

    def _settle(self) -> None:
        for slot in self.slots.values():
            if isinstance(slot.phase, Draining) and not self._at_work(slot):
                self._stop(slot, "no request in flight")
            instance = slot.ready
            if instance is None:
                continue
            if not instance.variant.engine.local:
                self._watch_health(slot)
            idle = instance.variant.timeouts.idle
            quiet = not self.scheduler.in_flight(instance) and not self.scheduler.queued_for(slot.model)
            if idle > 0 and quiet and not slot.armed(Timer.IDLE):
                slot.arm(Timer.IDLE, idle)
            wanted = self._wanted.get(slot.model)
            if wanted is not None and wanted.variant == instance.variant:
                del self._wanted[slot.model]
                wanted.answer()

    def _wants(self, slot: EngineSlot) -> bool:
        """Someone waits for the engine this slot is starting: a request, or a load."""
        return slot.model in self._wanted or self.scheduler.queued_for(slot.model) > 0

    def _drain_unneeded(self, slot: EngineSlot) -> bool:
        """A drain the queue asked for that it no longer needs: the plan, with the engine
        ready again, would neither evict it nor replace it."""
        assert isinstance(slot.phase, Draining)
        views = self._views()
        views[slot.model] = self._view(slot, as_ready=slot.phase.instance)
        start = self._plan(self._waiting(), views).start
        return start is None or (start.variant.model != slot.model and slot.model not in start.evict)

    def _selector(self) -> ModelSelector:
        return ModelSelector(self.capacity)

    def _model(self, name: str) -> Model:
        model = self.config.resolve(name)
        assert model is not None and model.name == name
        return model

    def _slot(self, model: str) -> EngineSlot:
        slot = self.slots.get(model)
        if slot is None:
            slot = self.slots[model] = EngineSlot(model, self._post, self._recorded)
        return slot

    def _recorded(self, record: TransitionRecord) -> None:
        self.history.append(record)
        self.live.publish(LiveKind.TRANSITION, record.as_json())

    def _publish_queue(self) -> None:
        """The waiting requests by model (how many, since when), when they changed."""
        shown: dict[str, Any] = {}
        for pending in self.scheduler.queue:
            entry = shown.setdefault(pending.model.name, {"count": 0, "oldest": pending.arrived_wall})
            entry["count"] += 1
            entry["oldest"] = min(entry["oldest"], pending.arrived_wall)
        if shown != self._queue_shown:
            self._queue_shown = shown
            self.live.publish(LiveKind.QUEUE, {"models": shown})

    def _waiting(self) -> list[Waiting]:
        """The queue as the policy sees it. A request's view changes only when it is
        counted, its engine changes or the estimator learns: it is kept until then (each
        decision looks at the whole queue, and a long queue must not cost its length
        squared)."""
        kept, self._waiting_kept = self._waiting_kept, {}
        for pending in self.scheduler.queue:
            slot = self.slots.get(pending.model.name)
            ready = slot.ready if slot is not None else None
            key = (pending.exact_tokens, pending.method, self.estimator.learned)
            seen = kept.get(pending.seq)
            if seen is None or seen[0] != key or seen[1] is not ready:
                seen = (key, ready, self._as_waiting(pending))
            self._waiting_kept[pending.seq] = seen
        return [self._waiting_kept[pending.seq][2] for pending in self.scheduler.queue]

    def _as_waiting(self, pending: PendingRequest) -> Waiting:
        needs = self._needs(pending)
        slot = self.slots.get(pending.model.name)
        instance = slot.ready if slot is not None else None
        if needs.exact or instance is None:
            return Waiting(pending.seq, pending.model, needs)
        # Granted on an estimate, it is counted only after the grant: reserve the bound.
        bound = instance.upper_bound(pending.kind, pending.shape)
        return Waiting(pending.seq, pending.model, needs, bound or 0)

    def _needs(self, pending: PendingRequest) -> Needs:
        """What a request needs: counted, or estimated from what its model taught."""
        return pending.needs(self.estimator.estimate(pending.model.name, pending.shape))

    def _views(self) -> dict[str, EngineView]:
        return {model: self._view(slot, slot.ready) for model, slot in self.slots.items()}

    def _remote(self, name: str) -> bool:
        model = self.config.resolve(name)
        return model is not None and model.name == name and not model.engine.local

    def _keep_loaded(self, name: str) -> bool:
        model = self.config.resolve(name)
        return model is not None and model.name == name and model.keep_loaded

    def _view(self, slot: EngineSlot, as_ready: EngineInstance | None) -> EngineView:
        keep = self._keep_loaded(slot.model)
        memory = slot.memory.reserved if slot.memory is not None and slot.active else 0
        if as_ready is None:
            local = slot.variant is None or slot.variant.engine.local
            return EngineView(
                slot.model, slot.state, memory=memory, last_used=slot.last_used, keep_loaded=keep, local=local
            )
        held, budget, cap = self._held(as_ready), as_ready.kv_budget, as_ready.slot_cap
        return EngineView(
            slot.model,
            EngineState.READY,
            _running(as_ready),
            free_tokens=None if budget is None else budget - sum(lease.tokens for lease in held),
            free_slots=None if cap is None else cap - sum(lease.slots for lease in held),
            idle=not held,
            residue=sum(slot.residue),
            clearing=slot.clearing is not None,
            memory=memory,
            last_used=slot.last_used,
            keep_loaded=keep,
            local=as_ready.variant.engine.local,
        )

    # --- engine steps: each fires the slot's trigger and launches its effect ----------------------

    def _drain(self, slot: EngineSlot, reason: str, resumable: bool) -> None:
        instance = slot.ready
        assert instance is not None
        self._measure(slot, instance)
        slot.drain(reason, resumable, instance.variant.timeouts.drain)

    def _stop(self, slot: EngineSlot, reason: str) -> None:
        slot.stop(self._effects, reason)

    def _start_finished(
        self, slot: EngineSlot, variant: Variant, instance: EngineInstance | None, error: StartFailed | None
    ) -> None:
        if isinstance(slot.phase, Stopping):  # cut short meanwhile
            if instance is not None:
                slot.stop_what_started(self._effects, instance)
            else:
                slot.stopped("engine killed while starting")
            return
        if instance is not None:
            self._on_ready(slot, instance)
        elif error is not None:
            self._on_start_failed(slot, variant, error)

    def _on_ready(self, slot: EngineSlot, instance: EngineInstance) -> None:
        slot.healthy(instance)
        self._measure(slot, instance)
        variant = instance.variant
        self.metrics.startup.labels(variant.model, str(variant.context)).observe(instance.startup_seconds)
        if self._unreachable.pop(variant.model, None) is not None:
            log.info("upstream of %s answers again: %s", variant.model, instance.client.base_url)
        log.info(
            "engine ready %s %s slot_context=%d startup=%.0fms memory=%s",
            variant.key,
            instance.where,
            instance.slot_context,
            instance.startup_seconds * 1000,
            _memory_text(slot.memory),
        )
        self._log_swap_done(slot, variant)
        if self._outdated(instance):
            self._drain(slot, f"config reload changed {variant.key}", resumable=False)

    def _measure(self, slot: EngineSlot, instance: EngineInstance) -> None:
        """Keep the largest figure an engine of this variant measured."""
        measured = self._effects.measure(instance)
        if measured is None:
            return
        variant = instance.variant
        self._measured[variant] = max(measured, self._measured.get(variant, 0))
        slot.memory = self.footprint(variant)
        self.metrics.engine_memory.labels(slot.model, "measured").set(self._measured[variant])
        self.metrics.engine_memory.labels(slot.model, "estimate").set(slot.memory.estimate)

    def _log_swap_done(self, slot: EngineSlot, variant: Variant) -> None:
        """One line for an operator: a swap that just ended, with its phases timed from
        the machines' own histories."""
        made = self._room_made.pop(variant.model, None)
        if made is None:
            return
        began, evicted, reason = made
        records = [r for r in self.history if r.model in evicted and r.monotonic >= began]
        drained = max((r.monotonic for r in records if r.trigger == "drained"), default=began)
        stopped = max((r.monotonic for r in records if r.trigger == "stopped"), default=drained)
        at = time.monotonic()
        log.info(
            "swap to %s done in %.0f ms: drain %.0f ms, stop %.0f ms, start %.0f ms (%s)",
            variant.key,
            (at - began) * 1000,
            (drained - began) * 1000,
            (stopped - drained) * 1000,
            (at - stopped) * 1000,
            reason,
        )

    def _on_start_failed(self, slot: EngineSlot, variant: Variant, error: StartFailed) -> None:
        self.last_engine_lines = error.last_lines
        self._count("start_failures", variant.model)
        slot.start_failed(error)
        log.error("engine start failed %s: %s", variant.key, error)
        self._fail_variant(variant, _start_error(error))
        self._count_failure(slot, variant, str(error))

    def _fail_variant(self, variant: Variant, error: GatewayError) -> None:
        """A start of this variant failed: the waiters it was for (and a load of it) get
        the error; those another variant of the model serves keep waiting for theirs."""
        wanted = self._wanted.get(variant.model)
        if wanted is not None and wanted.variant == variant:
            del self._wanted[variant.model]
            wanted.answer(error)
        selector = self._selector()

        def needs_it(pending: PendingRequest) -> bool:
            return (
                pending.model.name == variant.model
                and selector.select(self._needs(pending), pending.model, None).variant == variant
            )

        self.scheduler.fail_waiters(error, needs_it)

    def _count_failure(self, slot: EngineSlot, variant: Variant, reason: str) -> None:
        """One more failed start or crash in a row of this variant: back off; at the
        limit, its waiters get 503 and the machine is reset. An upstream that failed
        is unreachable until a probe, repeated with the back-off, passes again."""
        failures = self._failures[variant.key] = self._failures[variant.key] + 1
        delay = min(BACKOFF_BASE * 2 ** (failures - 1), BACKOFF_MAX)
        self._retry_at[variant.key] = time.monotonic() + delay
        if not variant.engine.local:
            self._upstream_down(variant, reason)
            return
        if failures < self.config.server.max_start_failures:
            return
        self._failures.pop(variant.key)
        slot.reset(f"{variant.key}: {failures} failures in a row")
        tail = "\n".join(self.last_engine_lines[-10:])
        self._fail_variant(
            variant,
            Unavailable(
                f"the engine {variant.key} keeps failing "
                f"({self.config.server.max_start_failures} times in a row); last engine output:\n{tail}"
            ),
        )

    def _upstream_down(self, variant: Variant, reason: str) -> None:
        """Its waiters get 503 at once, and so do requests until it answers again; a
        load with no waiter probes it again after the back-off."""
        self._unreachable[variant.model] = reason
        self.scheduler.fail_waiters(
            self._unreachable_error(variant.model), lambda pending: pending.model.name == variant.model
        )
        if variant.model not in self._wanted:
            self._wanted[variant.model] = Load(variant, [])

    def _unreachable_error(self, model: str) -> Unavailable:
        retry = max((at for key, at in self._retry_at.items() if key.startswith(f"{model}@")), default=0.0)
        wait = max(1, math.ceil(retry - time.monotonic()))
        return Unavailable(
            f"the upstream of model {model!r} is unreachable ({self._unreachable[model]}); "
            f"it is probed again in the background",
            headers={"Retry-After": str(wait)},
        )

    def _stop_finished(self, instance: EngineInstance, code: int) -> None:
        slot = self.slots.get(instance.model.name)
        if slot is None or not isinstance(slot.phase, Stopping) or slot.phase.instance is not instance:
            return
        self._forget(slot, instance, "stopped", code)
        slot.stopped(
            f"{instance.where} stopped" if instance.port is None else f"{instance.where} exited with {code}"
        )

    def _forget(self, slot: EngineSlot, instance: EngineInstance, how: str, code: int | None) -> None:
        """The engine is gone: keep its last words, log one line, drop its memory gauges."""
        self.last_engine_lines = instance.process.last_lines()
        self.metrics.forget_engine(slot.model)
        uptime = time.monotonic() - instance.process.started_monotonic
        level = logging.INFO if how == "stopped" else logging.ERROR
        log.log(
            level,
            "engine %s %s %s exit=%s uptime=%.1fs in_flight=%d",
            how,
            instance.variant.key,
            instance.where,
            code,
            uptime,
            self.scheduler.in_flight(instance),
        )

    def _engine_exited(self, instance: EngineInstance, code: int) -> None:
        slot = self.slots.get(instance.model.name)
        if slot is None or slot.instance is not instance or slot.state not in _RUNNING:
            return  # a stop we asked for (the stop effect reports it), or killed as frozen
        self._forget(slot, instance, "crashed", code)
        self._crashed(slot, instance, f"{instance.where} exited with {code}")

    def _watch_health(self, slot: EngineSlot) -> None:
        """Probe the engine while it is at work: requests in flight, or abandoned ones it
        has not let go of (a frozen engine never answers their look at /slots). An
        upstream is probed all the time, every health_interval."""
        instance = slot.instance
        if instance is None or slot.armed(Timer.PROBE) or slot.probing is not None:
            return
        upstream = instance.model.upstream
        remote = not instance.variant.engine.local and upstream is not None
        slot.arm(Timer.PROBE, upstream.health_interval if remote and upstream else PROBE_INTERVAL)

    def _probed_always(self, slot: EngineSlot) -> bool:
        """An upstream is probed whether or not it is at work; a local engine only then."""
        instance = slot.instance
        return instance is not None and (not instance.variant.engine.local or self._at_work(slot))

    def _engine_probed(self, instance: EngineInstance, problem: str | None) -> None:
        slot = self.slots.get(instance.model.name)
        if slot is None or slot.instance is not instance:
            return  # its engine is gone (which cancelled the probe's task)
        slot.probing = None
        if slot.state not in _RUNNING:
            return
        if problem is None:
            if self._probed_always(slot):
                self._watch_health(slot)
            return
        # Frozen: its requests would wait forever. Killed, its connections break: those
        # that got no byte are retried once, streams end with an error event. (An
        # upstream is let go of: nothing is killed.)
        local = instance.variant.engine.local
        how = "frozen" if local else "unreachable"
        instance.process.kill_now()
        if (
            not local
        ):  # a killed engine's connections break (what got no byte is retried); an upstream's stay open
            instance.cut_off(f"the upstream is unreachable: {problem}")
        self._forget(slot, instance, how, None)
        self._count(how, instance.model.name)
        self._crashed(
            slot, instance, f"{instance.where} {'frozen, killed' if how == 'frozen' else how}: {problem}"
        )

    def _crashed(self, slot: EngineSlot, instance: EngineInstance, reason: str) -> None:
        self._count("crashes", instance.model.name)
        slot.died(reason)
        self._count_failure(slot, instance.variant, reason)

    def _slots_seen(self, instance: EngineInstance, busy: frozenset[int] | None, look: int) -> None:
        """A ghost is laid once none of the tasks that ran after it was abandoned runs."""
        slot = self.slots.get(instance.model.name)
        if slot is None or slot.instance is not instance:
            return  # its engine is gone (which cancelled the look's task)
        slot.looking = None
        for ghost in [g for g in slot.ghosts if busy is not None and g.look <= look]:
            if ghost.running is None:
                ghost.running = busy
            if not ghost.running & busy:  # type: ignore[operator]
                slot.ghosts.remove(ghost)
                slot.leave_residue(ghost.lease.tokens, instance.slots)
        if slot.ghosts:
            slot.arm(Timer.SLOTS, SLOTS_LOOK_INTERVAL)

    def _idle_slots_cleared(self, instance: EngineInstance, cleared: bool) -> None:
        slot = self.slots.get(instance.model.name)
        if slot is None or slot.instance is not instance:
            return  # its engine is gone (which cancelled the erase)
        slot.clearing = None
        # Cleared either way: a live engine that failed the erase still clears a slot as
        # its next prompt starts, and keeping the residue would ask for erases forever.
        slot.residue.clear()
        if not cleared:
            log.warning("erasing the idle slots of %s failed; its engine is probed", instance.variant.key)
            self._watch_health(slot)

    def _timer_fired(self, model: str | None, name: str, instance: EngineInstance | None) -> None:
        if model is None:
            self._retry = None  # the backoff ended; the reconcile after this event starts it
            return
        slot = self.slots.get(model)
        timer = Timer(name)
        if slot is None or (instance is not None and instance is not slot.instance):
            return  # armed for an engine that is gone
        slot.timers.pop(timer, None)
        if timer is Timer.IDLE and instance is not None and slot.ready is instance:
            if not self.scheduler.in_flight(instance) and not self.scheduler.queued_for(model):
                self._count("idle_unloads", model)
                self._drain(slot, f"idle for {instance.variant.timeouts.idle:g}s", resumable=False)
        elif timer is Timer.DRAIN and isinstance(slot.phase, Draining):
            cut = self.scheduler.in_flight(slot.phase.instance)
            # A swap, an unload or a shutdown: the engine is free to stop.
            slot.phase.instance.cut_off("drain_timeout passed while its engine was stopping")
            self._stop(slot, f"drain_timeout: {cut} request(s) still in flight are cut off")
        elif (
            timer is Timer.PROBE
            and instance is not None
            and slot.state in _RUNNING
            and self._probed_always(slot)
        ):
            slot.probe(self._effects, instance)
        elif timer is Timer.SLOTS:
            slot.look_at_slots(self._effects)

    def _arm_retry(self, delay: float) -> None:
        """Reconcile again after `delay`, unless a retry is due sooner already (one
        failing variant's long back-off must not hold up another's short one)."""
        loop = asyncio.get_running_loop()
        if self._retry is not None and self._retry.when() <= loop.time() + delay:
            return
        if self._retry is not None:
            self._retry.cancel()
        self._retry = loop.call_later(delay, self._post, ev.TimerFired(None, "retry", None))

    # --- control: load ahead of traffic, reload, unload, shut down ---------------------------

    def _load(self, variant: Variant, done: asyncio.Future[None]) -> None:
        if self._shutdown is not None:
            done.set_exception(_shutting_down())
            return
        previous = self._wanted.get(variant.model)
        if previous is not None and previous.variant == variant:
            previous.waiters.append(done)  # the same load asked for again
            return
        if previous is not None:
            previous.answer(Unavailable(f"superseded by a load of {variant.key}"))
        self._wanted[variant.model] = Load(variant, [done])

    def _reload(self, config: GatewayConfig) -> None:
        """New requests see the new config now; an engine is swapped only if its own
        model or variant changed (after its in-flight requests finish)."""
        self.config = config
        for name in [n for n in self._unreachable if not self._remote(n)]:
            del self._unreachable[name]  # no longer a remote model
        for pending in self.scheduler.queue:
            self._refresh(pending)
        for pending in [lease.pending for lease in self.scheduler.leases.values()]:
            self._refresh(pending)  # (requeued, it starts the variant the config now defines)
        for name, load in list(self._wanted.items()):
            current = self._current(name, load.variant.context)
            if current is None:
                del self._wanted[name]
                load.answer(Unavailable("the model or variant to load was removed by a reload"))
            else:
                load.variant = current[1]  # load it as the config now says
        for slot in self.slots.values():
            instance = slot.instance
            if instance is None or isinstance(slot.phase, Stopping):
                continue  # an engine still starting is checked when it is ready
            if not self._outdated(instance):
                current = self._current(instance.model.name, instance.variant.context)
                if current is not None:
                    instance.model, instance.variant = current  # the same engine, new rules
                    slot.memory = self.footprint(instance.variant)  # (a declared `memory` may change)
                continue
            log.info("config reload changed %s: it is replaced once idle", instance.variant.key)
            self._wind_down(slot, f"config reload changed {instance.variant.key}")

    def _refresh(self, pending: PendingRequest) -> None:
        """A request sees its model as the config now defines it. (One accepted for a model
        a reload removed is served under the old definition: nothing queued is lost.)"""
        model = self.config.resolve(pending.model.name)
        if model is not None and model.name == pending.model.name:
            pending.model = model

    def _current(self, model_name: str, context: int) -> tuple[Model, Variant] | None:
        """A variant as the config now defines it."""
        model = self.config.resolve(model_name)
        variant = model.variant_for(context) if model and model.name == model_name else None
        return (model, variant) if model and variant else None

    def _outdated(self, instance: EngineInstance) -> bool:
        """The config now starts this model's variant differently. (An engine of a model
        the reload removed keeps serving the requests accepted for it; an eviction or the
        idle timeout ends it.)"""
        current = self._current(instance.model.name, instance.variant.context)
        model = self.config.resolve(instance.model.name)
        if current is None:
            return model is not None and model.name == instance.model.name  # variant removed
        return _engine_spec(*current) != _engine_spec(instance.model, instance.variant)

    def _unload(self, model: str | None, done: asyncio.Future[None]) -> None:
        """Stop one model's engine or every engine (after a drain); `done` resolves when
        they are down."""
        for name in [n for n in self._wanted if model in (None, n)]:
            self._wanted.pop(name).answer(Unavailable("cancelled by an unload"))
        for name in [n for n in self._unreachable if model in (None, n)]:
            del self._unreachable[name]  # the next request probes it afresh
        targets = [s for s in self.slots.values() if model in (None, s.model) and s.active]
        for slot in targets:
            self._wind_down(slot, "unload requested")
        self._unloading.append(Unload({slot: slot.stops for slot in targets}, done))

    def _answer_unloads(self) -> None:
        for unload in [u for u in self._unloading if u.finished()]:
            self._unloading.remove(unload)
            if not unload.done.done():
                unload.done.set_result(None)

    def _begin_shutdown(self, done: asyncio.Future[None]) -> None:
        """No engine starts any more; those running serve what waits for them first
        (see _continue_shutdown)."""
        self._shutdown = done
        for name in list(self._wanted):
            self._wanted.pop(name).answer(_shutting_down())
        if self._retry is not None:
            self._retry.cancel()
        for slot in self.slots.values():
            slot.cancel(Timer.IDLE)
            if isinstance(slot.phase, Draining):
                slot.phase.resumable = False  # no `resume` may undo it now

    def _served_soon(self, pending: PendingRequest) -> bool:
        """Whether the model's engine serves the request once it has room: it is ready
        and large enough, or starting the variant the request needs."""
        slot = self.slots.get(pending.model.name)
        if slot is None:
            return False
        instance, needs = slot.ready, self._needs(pending)
        if instance is not None:
            return self._selector().select(needs, pending.model, _running(instance)).outcome is Outcome.REUSED
        if isinstance(slot.phase, Starting):
            return self._selector().select(needs, pending.model, None).variant == slot.phase.variant
        return False

    def _wind_down(self, slot: EngineSlot, reason: str) -> None:
        """Bring an engine down for good: drain it, keep a drain going, or cut a start."""
        if slot.ready is not None:
            self._drain(slot, reason, resumable=False)
        elif isinstance(slot.phase, Draining):
            slot.phase.resumable = False  # no `resume` may undo this one
        elif isinstance(slot.phase, Starting):
            slot.abort(reason)

    def _continue_shutdown(self) -> None:
        """After every event while shutting down:

        1. Waiting requests a running engine, or one already starting, serves are granted
           as ever: nothing queued is lost. Those it cannot serve (their model runs no
           engine, or one too small) get 503 now: no other engine starts any more.
        2. Engines no request waits for are drained (or their start cut short); drained
           engines with nothing at work are stopped.
        3. Once every engine is down, the shutdown is answered.
        """
        self._grant(self._answered_plan())
        self.scheduler.fail_waiters(_shutting_down(), lambda pending: not self._served_soon(pending))
        for slot in self.slots.values():
            waited_for = self.scheduler.queued_for(slot.model) > 0
            if slot.ready is not None and not waited_for:
                self._drain(slot, "shutdown", resumable=False)
            elif isinstance(slot.phase, Starting) and not waited_for:
                slot.abort("shutdown")
            if isinstance(slot.phase, Draining) and not self._at_work(slot):
                self._stop(slot, "shutdown: no request in flight")
        if all(not s.active for s in self.slots.values()) and self._shutdown and not self._shutdown.done():
            self._shutdown.set_result(None)

    # --- counting and showing -----------------------------------------------------------------

    def _count(self, name: str, model: str, amount: int = 1) -> None:
        self.counters[name] += amount
        self.metrics.count(name, model, amount)

    def snapshot(self) -> dict[str, Any]:
        """The state for /gateway/state (read between events; the loop is single-threaded)."""
        shown = (s for s in self.slots.values() if s.active or s.state is EngineState.CRASHED)
        engines = [self._engine_json(slot) for slot in shown]
        budget = self.config.server.memory_budget
        reserved = sum(slot.memory.reserved for slot in self.slots.values() if slot.active and slot.memory)
        waiting = Counter(p.model.name for p in self.scheduler.queue)
        return {
            "engines": engines,
            "memory": {
                "budget": budget,
                "reserved": reserved,
                "free": None if budget is None else budget - reserved,
                "max_engines": self.config.server.max_engines,
            },
            "in_flight": len(self.scheduler.leases),
            "queued": {"count": len(self.scheduler.queue), "models": dict(waiting)},
            "history": [record.as_json() for record in self.history],
            "counters": dict(self.counters),
            "selections": list(self.scheduler.selections),
            "prompt_cache": self._effects.cached_prompts(),
            "engine_log": self.last_engine_lines,
        }

    def _engine_json(self, slot: EngineSlot) -> dict[str, Any]:
        instance, variant = slot.instance, slot.variant
        return {
            "model": slot.model,
            "engine": variant.engine.value if variant else None,
            "upstream": instance.client.base_url if instance and instance.port is None else None,
            "unreachable": self._unreachable.get(slot.model),
            "state": slot.state.value,
            "variant": {"context": variant.context, "key": variant.key} if variant else None,
            "slot_context": instance.slot_context if instance else None,
            "pid": instance.process.pid if instance else None,
            "port": instance.port if instance else None,
            "in_flight": self.scheduler.in_flight(instance) if instance else 0,
            "queued": self.scheduler.queued_for(slot.model),
            "memory": slot.memory.as_json() if slot.memory and slot.active else None,
            "keep_loaded": self._keep_loaded(slot.model),
            "last_used": slot.last_used_wall,
            "history": [record.as_json() for record in slot.lifecycle.history],
            "engine_log": instance.process.last_lines() if instance else slot.last_lines,
        }


_RUNNING = (EngineState.READY, EngineState.DRAINING)


def _shutting_down() -> Unavailable:
    """A load balancer in front sends a retry to another gateway."""
    return Unavailable("the gateway is shutting down", headers={"Retry-After": "1"})


def _retrieved(done: asyncio.Future[None]) -> None:
    """Mark an outcome nobody may await as seen (asyncio logs unseen exceptions)."""
    if not done.cancelled():
        done.exception()


def _running(instance: EngineInstance) -> RunningEngine:
    return RunningEngine(instance.variant, instance.slot_context, instance.kv_budget, instance.slots)


def _memory_text(memory: Memory | None) -> str:
    if memory is None:
        return "unknown"
    measured = human_bytes(memory.measured) if memory.measured is not None else "unmeasured"
    return f"{human_bytes(memory.estimate)} estimated, {measured} measured"


def _start_error(error: StartFailed) -> GatewayError:
    tail = "\n".join(error.last_lines[-10:])
    message = f"{error}" + (f"; last engine output:\n{tail}" if tail else "")
    if error.kind == "timeout":
        return EngineTimeout(message)
    if error.kind == "unreachable":
        return Unavailable(message, headers={"Retry-After": "1"})
    if error.kind == "spawn":
        return Unavailable(message)
    return EngineFailed(message)


def _engine_spec(model: Model, variant: Variant) -> tuple[Any, ...]:
    """What starting an engine depends on; a reload that keeps it keeps the engine."""
    return (
        model.engine,
        model.binary,
        model.args,
        sorted(model.env.items()),
        variant.context,
        variant.args,
        variant.binary,
        model.upstream,
    )
