"""The supervisor's control steps: load ahead of traffic, reload, unload, shut down.

Part of `Supervisor` (a mixin over its state).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from gateway.config.schema import GatewayConfig, Model, Variant
from gateway.engine.manager import EngineInstance
from gateway.errors import Unavailable
from gateway.supervisor.state import SupervisorState

log = logging.getLogger("gateway.supervisor")


class ControlSteps(SupervisorState):
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
        if self._wanted is not None:
            current = self._current(self._wanted[0].model, self._wanted[0].context)
            if current is None:
                self._cancel_wanted(Unavailable("the model or variant to load was removed by a reload"))
            else:
                self._wanted = (current[1], self._wanted[1])  # load it as the config now says
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
        elif state == "starting":
            self._cancel_start()

    def _continue_shutdown(self) -> None:
        state = self.lifecycle.state
        if state == "draining" and not self._engine_at_work():
            self._finish_drain("shutdown: no request in flight")
        elif state in ("idle", "crashed") and self._shutdown is not None and not self._shutdown.done():
            self._shutdown.set_result(None)


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
