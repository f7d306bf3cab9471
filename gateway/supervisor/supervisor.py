"""The supervisor: one asyncio task that owns the queue, the leases and the engine's state.

Handlers and effect tasks never touch that state; they post events to the supervisor's
inbox and await futures. After every event the supervisor asks the pure queue policy
what to do and turns the answer into machine triggers and effects (start, stop, timers)
whose results come back as events. One task, so no locks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.config.schema import GatewayConfig, Model, Variant
from gateway.engine.manager import EngineInstance, StartFailed
from gateway.errors import (
    ContextLengthExceeded,
    EngineFailed,
    EngineTimeout,
    GatewayError,
    Unavailable,
)
from gateway.models import ModelSelector, Needs, PromptShape, RunningEngine, Selection, TokenEstimator
from gateway.supervisor import events as ev
from gateway.supervisor.machine import EngineLifecycle
from gateway.supervisor.policy import EngineView, Plan, Waiting, plan
from gateway.supervisor.requests import Grant, PendingRequest
from gateway.utils.metrics import Metrics

log = logging.getLogger("gateway.supervisor")

RECENT_SELECTIONS = 20
PROMPT_PARAM = {"chat": "messages", "completion": "prompt", "embedding": "input"}
BACKOFF_BASE = 0.25  # seconds before the first restart after a failure; doubles, bounded
BACKOFF_MAX = 8.0


class Effects(Protocol):
    """What the supervisor does to the world: the EngineManager, or a fake in tests."""

    def capacity(self, variant: Variant, model: Model) -> int: ...

    async def start(self, model: Model, variant: Variant) -> EngineInstance: ...

    async def stop(self, instance: EngineInstance) -> int: ...


@dataclass
class _Lease:
    pending: PendingRequest
    instance: EngineInstance
    tokens: int  # context it reserves on its engine: its needs, exact once counted


class Supervisor:
    def __init__(self, config: GatewayConfig, effects: Effects, metrics: Metrics | None = None) -> None:
        self.config = config
        self._effects = effects
        self.lifecycle = EngineLifecycle()
        self.estimator = TokenEstimator()
        self._inbox: asyncio.Queue[ev.Event] = asyncio.Queue()
        self._queue: list[PendingRequest] = []
        self._leases: dict[int, _Lease] = {}
        self._instance: EngineInstance | None = None  # the engine of starting..stopping
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
        if self._effect is not None:
            self._effect.cancel()
            await asyncio.gather(self._effect, return_exceptions=True)

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

    def release(self, grant: Grant, requeue_reason: str | None = None, served: bool = False) -> None:
        """End a lease, exactly once per grant. With a reason, the holder will `acquire`
        again for the same request, which keeps its place in the queue."""
        self._post(ev.LeaseReleased(grant.lease, requeue_reason, served))

    def observe(self, grant: Grant, shape: PromptShape, tokens: int) -> None:
        """An exact count on the granted engine: the lease's reservation, and the
        model's tokens per byte to learn from."""
        self._post(ev.TokensCounted(grant.lease, grant.instance.model.name, shape, tokens))

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

    def _post(self, event: ev.Event) -> None:
        self._inbox.put_nowait(event)

    # --- the run loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            event = await self._inbox.get()
            try:
                self._handle(event)
                self._reconcile()
            except Exception:
                log.exception("supervisor: error handling %s", type(event).__name__)

    def _handle(self, event: ev.Event) -> None:
        match event:
            case ev.RequestArrived(pending):
                self._arrive(pending)
            case ev.RequestCancelled(pending):
                if pending in self._queue:
                    self._queue.remove(pending)
                    self._count("cancelled_waiting", pending.model.name)
            case ev.LeaseReleased(lease, requeue, served):
                self._release(lease, requeue, served)
            case ev.TokensCounted(lease_id, model, shape, tokens):
                self.estimator.observe(model, shape, tokens)
                self._count("tokens_counted", model, tokens)
                if (lease := self._leases.get(lease_id)) is not None:
                    lease.tokens = tokens + lease.pending.reserve
            case ev.StartFinished(variant, instance, error):
                self._start_finished(variant, instance, error)
            case ev.StopFinished(instance, code):
                self._stop_finished(instance, code)
            case ev.EngineExited(instance, code):
                self._engine_exited(instance, code)
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
            self._effect.cancel()  # type: ignore[union-attr]
        self._apply(plan(self._waiting(), self._view(), self._selector()))

    def _apply(self, decision: Plan) -> None:
        """Carry out the policy's plan: rejects, grants, then a swap, a stop or a start."""
        for item, selection in decision.rejects:
            self._reject(self._by_seq(item.seq), selection)
        target = self._next_target(decision.next)
        if self.lifecycle.state == "ready":
            for item, selection in decision.grants:
                self._grant(self._by_seq(item.seq), selection, item.reservation)
            if target is not None:
                self._swap_to(*target)  # now draining: it may end at once, below
            elif not self._queue:
                self._arm_idle_timer()
        if self.lifecycle.state == "draining" and not self._instance_leases():
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
        as_ready = EngineView("ready", RunningEngine(self._instance.variant, self._instance.slot_context))
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

    def capacity(self, variant: Variant) -> int:
        model = self.config.resolve(variant.model)
        if model is None or model.name != variant.model:  # removed by a reload meanwhile
            return variant.context
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
        return Waiting(pending.seq, pending.model, needs, bound + pending.reserve if bound else 0)

    def _needs(self, pending: PendingRequest) -> Needs:
        return pending.needs(self.estimator.estimate(pending.model.name, pending.shape))

    def _view(self) -> EngineView:
        instance = self._instance
        if instance is None or self.lifecycle.state != "ready":
            return EngineView(self.lifecycle.state, None)
        leases = [lease for lease in self._leases.values() if lease.instance is instance]
        budget = instance.kv_budget
        return EngineView(
            "ready",
            RunningEngine(instance.variant, instance.slot_context),
            free_tokens=None if budget is None else budget - sum(lease.tokens for lease in leases),
            idle=not leases,
        )

    def _by_seq(self, seq: int) -> PendingRequest:
        return next(p for p in self._queue if p.seq == seq)

    # --- granting and rejecting ---------------------------------------------------------------

    def _grant(self, pending: PendingRequest, selection: Selection, tokens: int) -> None:
        assert self._instance is not None and pending.future is not None
        self._cancel_timer("idle")
        grant = Grant(self._instance, selection)
        self._leases[grant.lease] = _Lease(pending, self._instance, tokens)
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
        pending.future.set_exception(
            ContextLengthExceeded(
                f"this request needs {needs.total} tokens of context ({needs.prompt_tokens} prompt "
                f"tokens + {needs.reserve} reserved for the answer), but the largest context of "
                f"model {pending.model.name!r} is {self._largest(pending.model)}",
                param=PROMPT_PARAM.get(pending.kind),
            )
        )

    def _release(self, lease_id: int, requeue_reason: str | None, served: bool) -> None:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return
        if served:
            self._failures.pop(lease.pending.model.name, None)  # the model works again
        if requeue_reason is not None:
            self._count("requeued", lease.pending.model.name)
            log.info("request %s goes back to the queue: %s", lease.pending.request_id, requeue_reason)

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

    # --- starting and stopping ------------------------------------------------------------------

    def _start(
        self, variant: Variant, why: str, pending: PendingRequest | None, selection: Selection | None
    ) -> None:
        model = pending.model if pending is not None else self._model(variant.model)
        delay = self._retry_at.get(model.name, 0.0) - time.monotonic()
        if delay > 0:
            self._arm_timer("retry", delay, None)  # backoff after failures; reconcile again then
            return
        if pending is not None and selection is not None:
            self._log_selection(pending, selection)
        self._target = variant
        self._fire("start", f"{why} needs {variant.key}")
        self._count("starts", model.name)
        self._run_effect(self._starting(model, variant))

    async def _starting(self, model: Model, variant: Variant) -> None:
        try:
            instance = await self._effects.start(model, variant)
        except StartFailed as exc:
            self._post(ev.StartFinished(variant, None, exc))
        except asyncio.CancelledError:
            self._post(ev.StartFinished(variant, None, StartFailed("aborted", "start aborted")))
            raise
        except Exception as exc:  # an engine answering nonsense while starting
            self._post(ev.StartFinished(variant, None, StartFailed("exited", str(exc))))
        else:
            self._post(ev.StartFinished(variant, instance, None))

    def _start_finished(
        self, variant: Variant, instance: EngineInstance | None, error: StartFailed | None
    ) -> None:
        self._effect = None
        self._target = None
        if instance is not None:
            self._on_ready(instance)
        elif error is not None and error.kind == "aborted":
            self._fire("abort", "start aborted")
            self._fire("stopped", "engine killed while starting")
        elif error is not None:
            self._on_start_failed(variant, error)

    def _on_ready(self, instance: EngineInstance) -> None:
        self._instance = instance
        self._watch_exit(instance)
        variant, pid, startup_ms = instance.variant, instance.process.pid, instance.startup_seconds * 1000
        self.metrics.startup.labels(variant.model, str(variant.context)).observe(instance.startup_seconds)
        self._fire("healthy", f"pid {pid} port {instance.port} in {startup_ms:.0f} ms")
        log.info(
            "engine ready %s pid=%s port=%d slot_context=%d startup=%.0fms",
            variant.key,
            pid,
            instance.port,
            instance.slot_context,
            startup_ms,
        )
        self._log_swap_done(variant)
        if self._shutdown is not None:
            self._drain("shutdown")
        elif self._outdated(instance):
            self._drain(f"config reload changed {variant.key}")

    def _log_swap_done(self, variant: Variant) -> None:
        """One line for an operator: a swap that just ended, with its phases timed from
        the machine's own history."""
        steps = list(self.lifecycle.history)[-5:]
        if [r.trigger for r in steps] != ["drain", "drained", "stopped", "start", "healthy"]:
            return
        if not steps[0].reason.startswith("swap"):
            return
        at = [r.monotonic * 1000 for r in steps]
        log.info(
            "swap to %s done in %.0f ms: drain %.0f ms, stop %.0f ms, start %.0f ms (%s)",
            variant.key,
            at[4] - at[0],
            at[1] - at[0],
            at[2] - at[1],
            at[4] - at[2],
            steps[0].reason,
        )

    def _on_start_failed(self, variant: Variant, error: StartFailed) -> None:
        self.last_engine_lines = error.last_lines
        self._count("start_failures", variant.model)
        self._fire("fail", str(error))
        log.error("engine start failed %s: %s", variant.key, error)
        self._fail_model(variant.model, self._start_error(error))
        self._count_failure(variant.model)

    def _start_error(self, error: StartFailed) -> GatewayError:
        tail = "\n".join(error.last_lines[-10:])
        message = f"{error}" + (f"; last engine output:\n{tail}" if tail else "")
        if error.kind == "timeout":
            return EngineTimeout(message)
        if error.kind == "spawn":
            return Unavailable(message)
        return EngineFailed(message)

    def _fail_model(self, model_name: str, error: GatewayError) -> None:
        """A start of this model failed: its waiters (and a load of it) get the error."""
        if self._wanted is not None and self._wanted[0].model == model_name:
            self._cancel_wanted(error)
        self._fail_waiters(error, model_name)

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

    def _count_failure(self, model_name: str) -> bool:
        """One more failed start or crash in a row: back off; True when the limit is reached."""
        failures = self._failures[model_name] = self._failures[model_name] + 1
        delay = min(BACKOFF_BASE * 2 ** (failures - 1), BACKOFF_MAX)
        self._retry_at[model_name] = time.monotonic() + delay
        if failures < self.config.server.max_start_failures:
            return False
        self._failures.pop(model_name)
        self._fire("reset", f"{model_name}: {failures} failures in a row")
        return True

    def _drain(self, reason: str, for_swap: bool = False) -> None:
        self._cancel_timer("idle")
        self._draining_for_swap = for_swap
        self._fire("drain", reason)
        assert self._instance is not None
        self._arm_timer("drain", self._instance.variant.timeouts.drain, self._instance)

    def _finish_drain(self, reason: str) -> None:
        self._fire("drained", reason)
        self._launch_stop()

    def _launch_stop(self) -> None:
        self._cancel_timer("drain")
        instance = self._instance
        assert instance is not None

        async def stopping() -> None:
            code = await self._effects.stop(instance)
            self._post(ev.StopFinished(instance, code))

        self._run_effect(stopping())

    def _stop_finished(self, instance: EngineInstance, code: int) -> None:
        self._effect = None
        self._forget(instance, "stopped", code)
        self._fire("stopped", f"pid {instance.process.pid} exited with {code}")

    def _forget(self, instance: EngineInstance, how: str, code: int) -> None:
        """The engine is gone: keep its last words, log one line."""
        self._instance = None
        self._cancel_timer("drain")
        self.last_engine_lines = instance.process.last_lines()
        uptime = time.monotonic() - instance.process.started_monotonic
        level = logging.ERROR if how == "crashed" else logging.INFO
        log.log(
            level,
            "engine %s %s pid=%s exit=%s uptime=%.1fs in_flight=%d",
            how,
            instance.variant.key,
            instance.process.pid,
            code,
            uptime,
            self._count_leases(instance),
        )

    def _watch_exit(self, instance: EngineInstance) -> None:
        def exited(task: asyncio.Task[int]) -> None:
            if not task.cancelled():
                self._post(ev.EngineExited(instance, task.result()))

        instance.exited.add_done_callback(exited)

    def _engine_exited(self, instance: EngineInstance, code: int) -> None:
        if instance is not self._instance or self.lifecycle.state not in ("ready", "draining"):
            return  # a stop we asked for; the stop effect reports it
        self._forget(instance, "crashed", code)
        self._count("crashes", instance.model.name)
        self._fire("died", f"pid {instance.process.pid} exited with {code}")
        if self._count_failure(instance.model.name):
            tail = "\n".join(self.last_engine_lines[-10:])
            self._fail_model(
                instance.model.name,
                Unavailable(
                    f"the engine of {instance.model.name!r} keeps failing "
                    f"({self.config.server.max_start_failures} times in a row); "
                    f"last engine output:\n{tail}"
                ),
            )

    def _run_effect(self, coro: Coroutine[Any, Any, None]) -> None:
        self._effect = asyncio.create_task(coro, name="supervisor-effect")

    # --- timers -------------------------------------------------------------------------------

    def _arm_timer(self, name: str, delay: float, instance: EngineInstance | None) -> None:
        self._cancel_timer(name)
        self._timers[name] = asyncio.get_running_loop().call_later(
            delay, self._post, ev.TimerFired(name, instance)
        )

    def _cancel_timer(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _arm_idle_timer(self) -> None:
        assert self._instance is not None
        idle = self._instance.variant.timeouts.idle
        if idle > 0 and not self._instance_leases() and "idle" not in self._timers:
            self._arm_timer("idle", idle, self._instance)

    def _timer_fired(self, name: str, instance: EngineInstance | None) -> None:
        self._timers.pop(name, None)
        if instance is not None and instance is not self._instance:
            return  # armed for an engine that is gone
        state = self.lifecycle.state
        if name == "idle" and state == "ready" and not self._instance_leases() and not self._queue:
            self._count("idle_unloads", instance.model.name)  # type: ignore[union-attr]
            self._drain(f"idle for {instance.variant.timeouts.idle:g}s")  # type: ignore[union-attr]
        elif name == "drain" and state == "draining":
            assert instance is not None
            cut = self._count_leases(instance)
            instance.cut_off()  # their answers end now; the engine is free to stop
            self._finish_drain(f"drain_timeout: {cut} request(s) still in flight are cut off")
        # "retry": the backoff ended; the reconcile after this event starts the engine

    # --- control: load, reload, unload and shutdown ---------------------------------------------

    def _load(self, variant: Variant, done: asyncio.Future[None]) -> None:
        if self._shutdown is not None:
            done.set_exception(Unavailable("the gateway is shutting down"))
            return
        self._cancel_wanted(Unavailable(f"superseded by a load of {variant.key}"))
        self._wanted = (variant, done)

    def _reload(self, config: GatewayConfig) -> None:
        """New requests see the new config now; the engine is swapped only if its own
        model or variant changed (after its in-flight requests finish)."""
        self.config = config
        for pending in self._queue:
            model = config.resolve(pending.model.name)
            if model is not None and model.name == pending.model.name:
                pending.model = model
            # else: accepted under the old config, it is served under the old one; nothing
            # queued is lost
        if self._wanted is not None and self._current(self._wanted[0].model, self._wanted[0].context) is None:
            self._cancel_wanted(Unavailable("the model or variant to load was removed by a reload"))
        instance = self._instance
        if instance is None:
            return  # an engine still starting is checked when it is ready
        if not self._outdated(instance):
            current = self._current(instance.model.name, instance.variant.context)
            if current is not None:
                instance.model, instance.variant = current  # the same engine, new rules
            return
        log.info("config reload changed %s: it is replaced once idle", instance.variant.key)
        self._wind_down(f"config reload changed {instance.variant.key}")

    def _current(self, model_name: str, context: int) -> tuple[Model, Variant] | None:
        """A variant as the config now defines it."""
        model = self.config.resolve(model_name)
        variant = model.variant_for(context) if model and model.name == model_name else None
        return (model, variant) if model and variant else None

    def _outdated(self, instance: EngineInstance) -> bool:
        """The config now starts this model's variant differently. (An engine of a model
        the reload removed keeps serving the requests accepted for it; a swap or the idle
        timeout ends it.)"""
        current = self._current(instance.model.name, instance.variant.context)
        model = self.config.resolve(instance.model.name)
        if current is None:
            return model is not None and model.name == instance.model.name  # variant removed
        return _engine_spec(*current) != _engine_spec(instance.model, instance.variant)

    def _unload(self, done: asyncio.Future[None]) -> None:
        """Stop the engine (after a drain); `done` resolves when none runs."""
        self._cancel_wanted(Unavailable("cancelled by an unload"))
        self._wind_down("unload requested")
        self._unloading.append(done)

    def _begin_shutdown(self, done: asyncio.Future[None]) -> None:
        self._shutdown = done
        self._cancel_wanted(Unavailable("the gateway is shutting down"))
        self._fail_waiters(Unavailable("the gateway is shutting down"))
        for name in ("idle", "retry"):
            self._cancel_timer(name)
        self._wind_down("shutdown")

    def _wind_down(self, reason: str) -> None:
        """Bring the engine down for good: drain it, keep a drain going, or cut a start."""
        state = self.lifecycle.state
        if state == "ready":
            self._drain(reason)
        elif state == "draining":
            self._draining_for_swap = False  # no `resume` may undo this one
        elif state == "starting" and self._effect is not None:
            self._effect.cancel()

    def _continue_shutdown(self) -> None:
        state = self.lifecycle.state
        if state == "draining" and not self._instance_leases():
            self._finish_drain("shutdown: no request in flight")
        elif state in ("idle", "crashed") and self._shutdown is not None and not self._shutdown.done():
            self._shutdown.set_result(None)

    # --- bookkeeping ----------------------------------------------------------------------------

    def _count(self, name: str, model: str, amount: int = 1) -> None:
        self.counters[name] += amount
        self.metrics.count(name, model, amount)

    def _fire(self, trigger: str, reason: str) -> None:
        self.lifecycle.fire(trigger, reason)

    def _instance_leases(self) -> int:
        return self._count_leases(self._instance) if self._instance is not None else 0

    def _count_leases(self, instance: EngineInstance) -> int:
        return sum(1 for lease in self._leases.values() if lease.instance is instance)

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
    )
