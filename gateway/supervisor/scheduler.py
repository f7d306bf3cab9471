"""The scheduler's books: the queue of waiting requests and the leases of granted ones.

The supervisor owns one and is its only caller. It decides nothing about engines; it
keeps arrival order, answers waiters, and logs every selection once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from typing import Any

from gateway.engine.manager import EngineInstance
from gateway.errors import ContextLengthExceeded, GatewayError, Unavailable
from gateway.models import Selection
from gateway.supervisor.requests import Grant, Lease, PendingRequest
from gateway.utils.live import LiveEvents, LiveKind
from gateway.utils.metrics import Metrics

log = logging.getLogger("gateway.supervisor")

RECENT_SELECTIONS = 20
PROMPT_PARAM = {"chat": "messages", "completion": "prompt", "embedding": "input"}


class Scheduler:
    def __init__(self, metrics: Metrics, counters: Counter[str], live: LiveEvents) -> None:
        self.queue: list[PendingRequest] = []  # in arrival order
        self.leases: dict[int, Lease] = {}
        self.selections: deque[dict[str, Any]] = deque(maxlen=RECENT_SELECTIONS)
        self._seq = itertools.count(1)
        self._metrics = metrics
        self._counters = counters
        self._live = live

    # --- the queue ---------------------------------------------------------------------------

    def enqueue(self, pending: PendingRequest, limit: int) -> bool:
        """Queue a request in arrival order (a requeued one keeps its place); False when
        the queue is full (it has its 503 then)."""
        assert pending.future is not None
        if len(self.queue) >= limit and not pending.seq:
            # (a requeued request, seq already set, was accepted before and keeps its place)
            self._count("rejected_queue_full", pending.model.name)
            fail(
                pending.future,
                Unavailable(
                    f"too many waiting requests ({limit}); retry later", headers={"Retry-After": "1"}
                ),
            )
            return False
        if not pending.seq:
            pending.seq = next(self._seq)
        self.queue.append(pending)
        self.queue.sort(key=lambda p: p.seq)
        return True

    def cancel(self, pending: PendingRequest) -> None:
        if pending in self.queue:
            self.queue.remove(pending)
            self._count("cancelled_waiting", pending.model.name)

    def prune(self) -> None:
        """Forget waiters that have their answer (cancelled, or failed elsewhere)."""
        self.queue = [p for p in self.queue if p.future is not None and not p.future.done()]

    def by_seq(self, seq: int) -> PendingRequest:
        return next(p for p in self.queue if p.seq == seq)

    def queued_for(self, model: str) -> int:
        return sum(1 for p in self.queue if p.model.name == model)

    def fail_waiters(
        self, error: GatewayError, which: Callable[[PendingRequest], bool] | None = None
    ) -> None:
        """Answer the queued requests (all, or `which` of them) with `error`."""
        for pending in [p for p in self.queue if which is None or which(p)]:
            self.queue.remove(pending)
            fail(pending.future, error)

    # --- answers -------------------------------------------------------------------------------

    def grant(
        self, pending: PendingRequest, selection: Selection, instance: EngineInstance, tokens: int, slots: int
    ) -> None:
        assert pending.future is not None
        grant = Grant(instance, selection)
        self.leases[grant.lease] = Lease(pending, instance, tokens, slots)
        self.queue.remove(pending)
        pending.future.set_result(grant)
        self._counters["granted"] += 1
        waited = time.monotonic() - pending.arrived
        self._metrics.queue_wait.labels(pending.model.name).observe(waited)
        self.log_selection(pending, selection)
        self._live.publish(
            LiveKind.GRANT,
            {
                "request_id": pending.request_id,
                "model": pending.model.name,
                "context": instance.variant.context,
                "waited": round(waited, 4),
                "in_flight": self.in_flight(instance),
            },
        )

    def reject(self, pending: PendingRequest, selection: Selection, largest: int) -> None:
        """No variant of its model is large enough: 400."""
        self.log_selection(pending, selection)
        needs = selection.needs
        each = f" for each of its {needs.sequences} sequences" if needs.sequences > 1 else ""
        least = "at least " if needs.method == "floor" else ""
        self.answer(
            pending,
            ContextLengthExceeded(
                f"this request needs {least}{needs.total} tokens of context{each} ({needs.prompt_tokens} "
                f"prompt tokens + {needs.reserve} reserved for the answer), but the largest context "
                f"of model {pending.model.name!r} is {largest}",
                param=PROMPT_PARAM.get(pending.kind),
            ),
        )

    def answer(self, pending: PendingRequest, error: GatewayError) -> None:
        """End a waiter's wait with an error."""
        if pending in self.queue:
            self.queue.remove(pending)
        fail(pending.future, error)

    # --- leases --------------------------------------------------------------------------------

    def release(self, lease_id: int, requeue_reason: str | None, served: bool) -> Lease | None:
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return None
        if requeue_reason is not None:
            self._count("requeued", lease.pending.model.name)
            log.info("request %s goes back to the queue: %s", lease.pending.request_id, requeue_reason)
        self._live.publish(
            LiveKind.RELEASE,
            {
                "request_id": lease.pending.request_id,
                "model": lease.instance.model.name,
                "requeue": requeue_reason,
                "served": served,
                "in_flight": self.in_flight(lease.instance),
            },
        )
        return lease

    def on(self, instance: EngineInstance) -> Iterator[Lease]:
        """The leases held on an engine."""
        return (lease for lease in self.leases.values() if lease.instance is instance)

    def in_flight(self, instance: EngineInstance) -> int:
        return sum(1 for _ in self.on(instance))

    # --- the selection log -----------------------------------------------------------------------

    def log_selection(self, pending: PendingRequest, selection: Selection) -> None:
        """One line per decision: a start or grant that carries out a logged one is not new."""
        if selection.variant is not None and selection.variant == pending.logged:
            return
        pending.logged = selection.variant
        logged = {
            "request_id": pending.request_id,
            "model": pending.model.name,
            "prompt_tokens": selection.needs.prompt_tokens,
            "method": selection.needs.method,
            "reserve": selection.needs.reserve,
            "context": selection.variant.context if selection.variant else None,
            "outcome": selection.outcome.value,
            "at": time.time(),
        }
        self.selections.append(logged)
        self._live.publish(LiveKind.SELECTION, logged)
        self._counters[f"selection_{selection.outcome.value}"] += 1
        self._metrics.selections.labels(
            pending.model.name, selection.outcome.value, selection.needs.method
        ).inc()
        log.info("select %s %s: %s", pending.request_id, pending.model.name, selection.describe())

    def _count(self, name: str, model: str) -> None:
        self._counters[name] += 1
        self._metrics.count(name, model)


def fail(future: asyncio.Future[Any] | None, error: GatewayError) -> None:
    """Answer a waiter with `error`, unless it has its answer already."""
    if future is not None and not future.done():
        future.set_exception(error)
