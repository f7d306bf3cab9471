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
from gateway.supervisor.state import SupervisorState

log = logging.getLogger("gateway.supervisor")

BACKOFF_BASE = 0.25  # seconds before the first restart after a failure; doubles, bounded
BACKOFF_MAX = 8.0


class EngineSteps(SupervisorState):
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
