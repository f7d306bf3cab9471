"""ModelSelector: which variant of a model serves a request. Pure: no I/O, no clocks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from gateway.config.schema import Model, Variant
from gateway.models.needs import Needs, Room


@dataclass(frozen=True)
class RunningEngine:
    """The engine that runs now, as far as selection cares."""

    variant: Variant
    slot_context: int  # what one request may use: n_ctx, or n_ctx / slots without a unified cache
    shared: int | None = None  # its unified KV cache; None: each slot has its own
    slots: int = 1

    @property
    def room(self) -> Room:
        return Room(self.slot_context, self.shared, self.slots)


class Outcome(StrEnum):
    REUSED = "reused"  # the running engine serves it
    STARTED = "started"  # nothing of this model runs: start the chosen variant
    UPGRADED = "upgraded"  # this model runs but is too small: swap to a larger variant
    REJECTED = "rejected"  # no variant is large enough


@dataclass(frozen=True)
class Selection:
    outcome: Outcome
    variant: Variant | None  # None only when rejected
    needs: Needs

    def describe(self) -> str:
        chosen = f"context={self.variant.context}" if self.variant else "none"
        return (
            f"prompt={self.needs.prompt_tokens} ({self.needs.method}) reserve={self.needs.reserve} "
            f"needs={self.needs.total} variant={chosen} {self.outcome.value}"
        )


# The context a variant gives requests when started (predicted before it is measured).
Capacity = Callable[[Variant], Room]


class ModelSelector:
    """Smallest sufficient variant; a running one that fits is never swapped for a smaller one."""

    def __init__(self, capacity: Capacity | None = None) -> None:
        self._capacity = capacity or (lambda v: Room(v.context))

    def select(self, needs: Needs, model: Model, running: RunningEngine | None) -> Selection:
        mine = running if running is not None and running.variant.model == model.name else None
        # A running engine of this model counts an estimated request exactly before serving it.
        if mine is not None and (not needs.exact or mine.room.fits(needs)):
            return Selection(Outcome.REUSED, mine.variant, needs)
        outcome = Outcome.UPGRADED if mine is not None else Outcome.STARTED
        candidates = [v for v in model.variants if mine is None or v != mine.variant]
        for variant in candidates:
            if self._capacity(variant).fits(needs):
                return Selection(outcome, variant, needs)
        if not needs.exact and candidates:
            # An estimate never rejects: the largest variant counts exactly, then decides.
            return Selection(outcome, candidates[-1], needs)
        return Selection(Outcome.REJECTED, None, needs)

    def largest_capacity(self, model: Model) -> int:
        """The most context one sequence of this model can get."""
        return max(self._capacity(v).slot_context for v in model.variants)
