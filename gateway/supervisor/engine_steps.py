"""The supervisor's engine steps: start, ready, fail, drain, stop, crash, timers.

Part of `Supervisor` (a mixin over its state): each step fires the machine's trigger and
launches the effect; the effect's result comes back as an event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from gateway.config.schema import Model, Variant
from gateway.engine.manager import EngineInstance, StartFailed
from gateway.errors import EngineFailed, EngineTimeout, GatewayError, Unavailable
from gateway.models import Selection
from gateway.supervisor import events as ev
from gateway.supervisor.requests import PendingRequest
from gateway.supervisor.state import Ghost, Lease, SupervisorState

log = logging.getLogger("gateway.supervisor")

BACKOFF_BASE = 0.25  # seconds before the first restart after a failure; doubles, bounded
BACKOFF_MAX = 8.0
# Seconds between health probes of an engine with requests in flight: one that stops
# answering (SIGSTOP, a driver fault, swapping) would otherwise hold them forever.
PROBE_INTERVAL = 1.0
# Seconds between looks at an engine's /slots while abandoned requests may still run.
SLOTS_LOOK_INTERVAL = 0.02


class EngineSteps(SupervisorState):
    def _start(
        self, variant: Variant, why: str, pending: PendingRequest | None, selection: Selection | None
    ) -> None:
        model = pending.model if pending is not None else self._model(variant.model)
        delay = self._retry_at.get(variant.key, 0.0) - time.monotonic()
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
        elif self._unloading:  # asked for while it started
            self._drain("unload requested")
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
        self._fail_variant(variant, self._start_error(error))
        self._count_failure(variant)

    def _start_error(self, error: StartFailed) -> GatewayError:
        tail = "\n".join(error.last_lines[-10:])
        message = f"{error}" + (f"; last engine output:\n{tail}" if tail else "")
        if error.kind == "timeout":
            return EngineTimeout(message)
        if error.kind == "spawn":
            return Unavailable(message)
        return EngineFailed(message)

    def _fail_variant(self, variant: Variant, error: GatewayError) -> None:
        """A start of this variant failed: the waiters it was for (and a load of it) get
        the error; those another variant of the model serves keep waiting for theirs."""
        if self._wanted is not None and self._wanted[0] == variant:
            self._cancel_wanted(error)
        selector = self._selector()

        def needs_it(pending: PendingRequest) -> bool:
            model = pending.model
            return (
                model.name == variant.model
                and selector.select(self._needs(pending), model, None).variant == variant
            )

        self._fail_waiters(error, needs_it)

    def _count_failure(self, variant: Variant) -> bool:
        """One more failed start or crash in a row of this variant: back off; True when
        the limit is reached."""
        failures = self._failures[variant.key] = self._failures[variant.key] + 1
        delay = min(BACKOFF_BASE * 2 ** (failures - 1), BACKOFF_MAX)
        self._retry_at[variant.key] = time.monotonic() + delay
        if failures < self.config.server.max_start_failures:
            return False
        self._failures.pop(variant.key)
        self._fire("reset", f"{variant.key}: {failures} failures in a row")
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
            try:
                code = await self._effects.stop(instance)
            except Exception:
                log.exception("stopping %s failed: killing it", instance.variant.key)
                instance.process.kill_now()
                code = -9
            self._post(ev.StopFinished(instance, code))

        self._run_effect(stopping())

    def _stop_finished(self, instance: EngineInstance, code: int) -> None:
        self._effect = None
        self._forget(instance, "stopped", code)
        self._fire("stopped", f"pid {instance.process.pid} exited with {code}")

    def _forget(self, instance: EngineInstance, how: str, code: int | None) -> None:
        """The engine is gone: keep its last words, log one line."""
        self._instance = None
        self._ghosts.clear()  # gone with their engine
        for name in ("drain", "probe", "slots"):
            self._cancel_timer(name)
        self.last_engine_lines = instance.process.last_lines()
        uptime = time.monotonic() - instance.process.started_monotonic
        level = logging.INFO if how == "stopped" else logging.ERROR
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
            return  # a stop we asked for (the stop effect reports it), or killed as frozen
        self._forget(instance, "crashed", code)
        self._crashed(instance, f"pid {instance.process.pid} exited with {code}")

    def _watch_health(self) -> None:
        """Probe the engine while it is at work: requests in flight, or abandoned ones it
        has not let go of (a frozen engine never answers their look at /slots)."""
        if "probe" not in self._timers and self._probe is None:
            self._arm_timer("probe", PROBE_INTERVAL, self._instance)

    def _probe_now(self, instance: EngineInstance) -> None:
        async def probing() -> None:
            self._post(ev.EngineProbed(instance, await self._effects.probe(instance)))

        self._probe = asyncio.create_task(probing(), name="supervisor-probe")

    def _engine_probed(self, instance: EngineInstance, problem: str | None) -> None:
        self._probe = None
        if instance is not self._instance or self.lifecycle.state not in ("ready", "draining"):
            return
        if problem is None:
            if self._engine_at_work():
                self._watch_health()
            return
        # Frozen: its requests would wait forever. Killed, its connections break: those
        # that got no byte are retried once, streams end with an error event.
        instance.process.kill_now()
        self._forget(instance, "frozen", None)
        self._count("frozen", instance.model.name)
        self._crashed(instance, f"pid {instance.process.pid} frozen, killed: {problem}")

    def _crashed(self, instance: EngineInstance, reason: str) -> None:
        self._count("crashes", instance.model.name)
        self._fire("died", reason)
        if self._count_failure(instance.variant):
            tail = "\n".join(self.last_engine_lines[-10:])
            self._fail_variant(
                instance.variant,
                Unavailable(
                    f"the engine {instance.variant.key} keeps failing "
                    f"({self.config.server.max_start_failures} times in a row); "
                    f"last engine output:\n{tail}"
                ),
            )

    # --- ghosts: abandoned requests the engine may still be working on ----------------------

    def _haunt(self, lease: Lease) -> None:
        self._ghosts.append(Ghost(lease, look=self._looks + 1))
        self._look_at_slots()  # the probe armed at its grant goes on while ghosts remain

    def _look_at_slots(self) -> None:
        """Ask the engine which tasks it runs (one look at a time)."""
        if self._looking_at_slots is not None or not self._ghosts or self._instance is None:
            return
        instance = self._instance
        self._looks += 1
        look = self._looks

        async def looking() -> None:
            try:
                busy: frozenset[int] | None = await self._effects.busy_tasks(instance)
            except Exception:  # looked again later; a dead engine's ghosts go with it
                busy = None
            self._post(ev.SlotsSeen(instance, busy, look))

        self._looking_at_slots = asyncio.create_task(looking(), name="supervisor-slots")

    def _slots_seen(self, instance: EngineInstance, busy: frozenset[int] | None, look: int) -> None:
        """A ghost is laid once none of the tasks that ran after it was abandoned runs."""
        self._looking_at_slots = None
        answered = busy is not None and instance is self._instance
        for ghost in [g for g in self._ghosts if answered and g.look <= look]:
            if ghost.running is None:
                ghost.running = busy
            if not ghost.running & busy:  # type: ignore[operator]
                self._ghosts.remove(ghost)
        self._ghosts = [g for g in self._ghosts if g.lease.instance is self._instance]
        if self._ghosts:
            self._arm_timer("slots", SLOTS_LOOK_INTERVAL, None)

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
        elif name == "probe" and state in ("ready", "draining") and self._engine_at_work():
            assert instance is not None
            self._probe_now(instance)
        elif name == "slots":
            self._look_at_slots()
        # "retry": the backoff ended; the reconcile after this event starts the engine
