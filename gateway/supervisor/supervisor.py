"""The supervisor: one asyncio task that owns the queue, the leases and the engine's state.

Handlers and effect tasks never touch that state; they post events to the supervisor's
inbox and await futures. After every event the supervisor asks the pure queue policy
what to do and turns the answer into machine triggers and effects (start, stop, timers)
whose results come back as events. One task, so no locks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

from gateway.config.schema import GatewayConfig, Model, Variant
from gateway.errors import ContextLengthExceeded, GatewayError, Unavailable
from gateway.models import ModelSelector, Needs, PromptShape, Room, RunningEngine, Selection, token_floor
from gateway.models.selector import Outcome
from gateway.supervisor import events as ev
from gateway.supervisor.control_steps import ControlSteps
from gateway.supervisor.engine_steps import EngineSteps
from gateway.supervisor.policy import EngineView, Plan, Waiting, plan
from gateway.supervisor.requests import Grant, PendingRequest
from gateway.supervisor.state import Lease, fail

log = logging.getLogger("gateway.supervisor")

FAULTS_REMEMBERED = 100  # distinct causes whose traceback was logged; then one line each
PROMPT_PARAM = {"chat": "messages", "completion": "prompt", "embedding": "input"}


class Supervisor(EngineSteps, ControlSteps):
    """The one task that owns the queue, the leases and the engine's state."""

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="supervisor")

    async def shutdown(self) -> None:
        """Refuse new work, let in-flight requests finish (bounded), stop the engine.

        The task keeps running afterwards, so that a request arriving late (a requeue
        after a cut-off, say) still gets its 503; `close` ends it.
        """
        done = asyncio.get_running_loop().create_future()
        self._post(ev.ShutdownRequested(done))
        await done

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for task in (self._effect, self._probe, self._looking_at_slots):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    # --- the API handlers use ------------------------------------------------------------

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

    def unload(self) -> asyncio.Future[None]:
        done = asyncio.get_running_loop().create_future()
        self._post(ev.UnloadRequested(done))
        return done

    def reload(self, config: GatewayConfig) -> None:
        self._post(ev.ConfigReloaded(config))

    def load(self, variant: Variant) -> asyncio.Future[None]:
        """Start `variant` ahead of traffic (queued requests go first); resolves when ready."""
        done = asyncio.get_running_loop().create_future()
        self._post(ev.LoadRequested(variant, done))
        return done

    # --- the run loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            event = await self._inbox.get()
            try:
                self._handle(event)
            except Exception as exc:
                self._event_failed(event, exc)
            self._reconcile_safely()

    # --- faults: one bad request or model never stalls the others --------------------------

    def _event_failed(self, event: ev.Event, exc: Exception) -> None:
        """Handling `event` raised: whoever waits on it gets a 500 naming the cause."""
        error = self._fault(f"handling {type(event).__name__}", exc)
        match event:
            case ev.RequestArrived(pending):
                if pending in self._queue:
                    self._queue.remove(pending)
                fail(pending.future, error)
            case ev.TokensCounted(fits=done) | ev.UnloadRequested(done) | ev.LoadRequested(done=done):
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
            view, selector = self._view(), self._selector()
            for pending in list(self._queue):
                try:
                    plan([self._as_waiting(pending)], view, selector)
                except Exception as exc:
                    self._queue.remove(pending)
                    fail(pending.future, self._fault(f"deciding for request {pending.request_id}", exc))
            self._reconcile()
        except Exception as exc:
            self._fail_waiters(self._fault("deciding", exc))

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

    def _handle(self, event: ev.Event) -> None:
        match event:
            case ev.RequestArrived(pending):
                self._arrive(pending)
            case ev.RequestCancelled(pending):
                if pending in self._queue:
                    self._queue.remove(pending)
                    self._count("cancelled_waiting", pending.model.name)
            case ev.LeaseReleased(lease, requeue, served, abandoned):
                self._release(lease, requeue, served, abandoned)
            case ev.SlotsSeen(instance, busy, look):
                self._slots_seen(instance, busy, look)
            case ev.TokensCounted(lease_id, model, shape, tokens, fits):
                self.estimator.observe(model, shape, tokens)
                self._count("tokens_counted", model, tokens)
                fits.set_result(self._recount(lease_id, tokens))
            case ev.StartFinished(variant, instance, error):
                self._start_finished(variant, instance, error)
            case ev.StopFinished(instance, code):
                self._stop_finished(instance, code)
            case ev.EngineExited(instance, code):
                self._engine_exited(instance, code)
            case ev.EngineProbed(instance, problem):
                self._engine_probed(instance, problem)
            case ev.TimerFired(name, instance):
                self._timer_fired(name, instance)
            case ev.UnloadRequested(done):
                self._unload(done)
            case ev.ConfigReloaded(config):
                self._reload(config)
            case ev.LoadRequested(variant, done):
                self._load(variant, done)
            case ev.ShutdownRequested(done):
                self._begin_shutdown(done)

    def _arrive(self, pending: PendingRequest) -> None:
        assert pending.future is not None
        if pending.future.done():
            return  # cancelled before it got here
        if self._shutdown is not None:
            pending.future.set_exception(Unavailable("the gateway is shutting down"))
        elif len(self._queue) >= self.config.server.queue_limit and not pending.seq:
            # (a requeued request, seq already set, was accepted before and keeps its place)
            self._count("rejected_queue_full", pending.model.name)
            pending.future.set_exception(
                Unavailable(
                    f"too many waiting requests ({self.config.server.queue_limit}); retry later",
                    headers={"Retry-After": "1"},
                )
            )
        else:
            if not pending.seq:
                pending.seq = next(self._seq)
            self._queue.append(pending)
            self._queue.sort(key=lambda p: p.seq)  # a requeued request keeps its place
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

    # --- deciding ------------------------------------------------------------------------

    def _reconcile(self) -> None:
        """Apply the queue policy to the current state; called after every event."""
        self._queue = [p for p in self._queue if p.future is not None and not p.future.done()]
        if self.lifecycle.state in ("idle", "crashed"):
            self._answer_unloads()
        if self._shutdown is not None:
            self._continue_shutdown()
            return
        if self.lifecycle.state == "draining" and self._swap_unneeded():
            self._cancel_timer("drain")
            self._fire("resume", "the requests that needed the swap are gone")
        if self.lifecycle.state == "starting" and self._start_unneeded():
            log.info("start of %s cut short: nobody waits for it any more", self._target.key)  # type: ignore[union-attr]
            self._cancel_start()
        self._apply(plan(self._waiting(), self._view(), self._selector()))

    def _apply(self, decision: Plan) -> None:
        """Carry out the policy's plan: rejects, grants, then a swap, a stop or a start."""
        for item, selection in decision.rejects:
            self._reject(self._by_seq(item.seq), selection)
        target = self._next_target(decision.next)
        if self.lifecycle.state == "ready":
            running = self._running()
            assert running is not None
            for item, selection in decision.grants:
                pending = self._by_seq(item.seq)
                self._grant(pending, selection, item.reservation(running), item.slot_use(running))
            if target is not None:
                self._swap_to(*target)  # now draining: it may end at once, below
            elif not self._queue:
                self._arm_idle_timer()
        if self.lifecycle.state == "draining" and not self._engine_at_work():
            self._finish_drain("no request in flight")
        elif self.lifecycle.state in ("idle", "crashed") and target is not None:
            self._start(*target)

    def _answer_unloads(self) -> None:
        for done in self._unloading:
            done.set_result(None)
        self._unloading.clear()

    def _start_unneeded(self) -> bool:
        """Starting an engine that no waiting request and no load wants any more."""
        if self._target is None or self._effect is None or self._effect.done() or self._wanted is not None:
            return False
        return not any(p.model.name == self._target.model for p in self._queue)

    def _swap_unneeded(self) -> bool:
        """Draining for a swap, but nothing waiting needs another engine any more."""
        if not self._draining_for_swap or self._instance is None or self._wanted is not None:
            return False
        as_ready = EngineView("ready", self._running())
        return plan(self._waiting(), as_ready, self._selector()).next is None

    def _next_target(
        self, head: tuple[Waiting, Selection] | None
    ) -> tuple[Variant, str, PendingRequest | None, Selection | None] | None:
        """The variant to run next: the queue's head decides, else a load asked for."""
        if head is not None:
            item, selection = head
            pending = self._by_seq(item.seq)
            assert selection.variant is not None
            return selection.variant, f"request {pending.request_id}", pending, selection
        if self._wanted is not None:
            variant, done = self._wanted
            if self._instance is not None and self._instance.variant == variant:
                if self.lifecycle.state == "ready":
                    done.set_result(None)
                    self._wanted = None
                return None
            return variant, "load requested", None, None
        return None

    def _swap_to(
        self, variant: Variant, why: str, pending: PendingRequest | None, selection: Selection | None
    ) -> None:
        if pending is not None and selection is not None:
            self._log_selection(pending, selection)
        assert self._instance is not None
        self._count("swaps", self._instance.model.name)
        self._drain(f"swap to {variant.key} for {why}", for_swap=True)

    def _largest(self, model: Model) -> int:
        return self._selector().largest_capacity(model)

    def _selector(self) -> ModelSelector:
        return ModelSelector(self.capacity)

    def capacity(self, variant: Variant) -> Room:
        model = self.config.resolve(variant.model)
        if model is None or model.name != variant.model:  # removed by a reload meanwhile
            return Room(variant.context)
        return self._effects.capacity(variant, model)

    def _model(self, name: str) -> Model:
        model = self.config.resolve(name)
        assert model is not None and model.name == name
        return model

    def _waiting(self) -> list[Waiting]:
        return [self._as_waiting(p) for p in self._queue]

    def _as_waiting(self, pending: PendingRequest) -> Waiting:
        needs = self._needs(pending)
        instance = self._instance
        if needs.exact or instance is None or instance.model.name != pending.model.name:
            return Waiting(pending.seq, pending.model, needs)
        # Granted on an estimate, it is counted only after the grant: reserve the bound.
        bound = instance.upper_bound(pending.kind, pending.shape)
        return Waiting(pending.seq, pending.model, needs, bound or 0)

    def _needs(self, pending: PendingRequest) -> Needs:
        return pending.needs(self.estimator.estimate(pending.model.name, pending.shape))

    def _running(self) -> RunningEngine | None:
        instance = self._instance
        if instance is None:
            return None
        return RunningEngine(instance.variant, instance.slot_context, instance.kv_budget, instance.slots)

    def _view(self) -> EngineView:
        now = time.monotonic()
        backing_off = {key for key, at in self._retry_at.items() if at > now}
        instance = self._instance
        if instance is None or self.lifecycle.state != "ready":
            return EngineView(self.lifecycle.state, None, backing_off=backing_off)
        held, budget = self._held(instance), instance.kv_budget
        return EngineView(
            "ready",
            self._running(),
            free_tokens=None if budget is None else budget - sum(lease.tokens for lease in held),
            free_slots=None if budget is None else instance.slots - sum(lease.slots for lease in held),
            idle=not held,
            backing_off=backing_off,
        )

    def _by_seq(self, seq: int) -> PendingRequest:
        return next(p for p in self._queue if p.seq == seq)

    # --- granting and rejecting ---------------------------------------------------------------

    def _grant(self, pending: PendingRequest, selection: Selection, tokens: int, slots: int) -> None:
        assert self._instance is not None and pending.future is not None
        self._cancel_timer("idle")
        self._watch_health()
        grant = Grant(self._instance, selection)
        self._leases[grant.lease] = Lease(pending, self._instance, tokens, slots)
        self._queue.remove(pending)
        pending.future.set_result(grant)
        self.counters["granted"] += 1
        self.metrics.queue_wait.labels(pending.model.name).observe(time.monotonic() - pending.arrived)
        self._log_selection(pending, selection)

    def _reject(self, pending: PendingRequest, selection: Selection) -> None:
        assert pending.future is not None
        self._log_selection(pending, selection)
        self._queue.remove(pending)
        needs = selection.needs
        each = f" for each of its {needs.sequences} sequences" if needs.sequences > 1 else ""
        least = "at least " if needs.method == "floor" else ""
        pending.future.set_exception(
            ContextLengthExceeded(
                f"this request needs {least}{needs.total} tokens of context{each} ({needs.prompt_tokens} "
                f"prompt tokens + {needs.reserve} reserved for the answer), but the largest context "
                f"of model {pending.model.name!r} is {self._largest(pending.model)}",
                param=PROMPT_PARAM.get(pending.kind),
            )
        )

    def _release(self, lease_id: int, requeue_reason: str | None, served: bool, abandoned: bool) -> None:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return
        if abandoned and lease.instance.kv_budget is not None and lease.instance is self._instance:
            self._haunt(lease)
        if served:
            self._failures.pop(lease.instance.variant.key, None)  # the variant works again
        if requeue_reason is not None:
            self._count("requeued", lease.pending.model.name)
            log.info("request %s goes back to the queue: %s", lease.pending.request_id, requeue_reason)

    def _recount(self, lease_id: int, tokens: int) -> bool:
        """The lease now reserves its exact needs; do all on its engine still fit?"""
        lease = self._leases.get(lease_id)
        if lease is None:
            return True
        running = self._running()
        if running is not None and lease.instance is self._instance:
            lease.tokens = running.room.reservation(lease.pending.needs(tokens))
        budget = lease.instance.kv_budget
        return budget is None or sum(held.tokens for held in self._held(lease.instance)) <= budget

    def _log_selection(self, pending: PendingRequest, selection: Selection) -> None:
        """One line per decision: a start or grant that carries out a logged one is not new."""
        if selection.variant is not None and selection.variant == pending.logged:
            return
        pending.logged = selection.variant
        entry = {
            "request_id": pending.request_id,
            "model": pending.model.name,
            "prompt_tokens": selection.needs.prompt_tokens,
            "method": selection.needs.method,
            "reserve": selection.needs.reserve,
            "context": selection.variant.context if selection.variant else None,
            "outcome": selection.outcome.value,
            "at": time.time(),
        }
        self.selections.append(entry)
        self.counters[f"selection_{selection.outcome.value}"] += 1
        self.metrics.selections.labels(
            pending.model.name, selection.outcome.value, selection.needs.method
        ).inc()
        log.info("select %s %s: %s", pending.request_id, pending.model.name, selection.describe())

    def snapshot(self) -> dict[str, Any]:
        """The state for /gateway/state (read between events; the loop is single-threaded)."""
        instance = self._instance
        variant = instance.variant if instance else self._target
        waiting = Counter(p.model.name for p in self._queue)
        return {
            "state": self.lifecycle.state,
            "model": variant.model if variant else None,
            "variant": {"context": variant.context, "key": variant.key} if variant else None,
            "slot_context": instance.slot_context if instance else None,
            "pid": instance.process.pid if instance else None,
            "port": instance.port if instance else None,
            "in_flight": len(self._leases),
            "queued": {"count": len(self._queue), "models": dict(waiting)},
            "history": [record.as_json() for record in self.lifecycle.history],
            "counters": dict(self.counters),
            "selections": list(self.selections),
            "engine_log": instance.process.last_lines() if instance else self.last_engine_lines,
        }
