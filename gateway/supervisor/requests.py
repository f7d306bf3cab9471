"""What flows between request handlers and the supervisor: pending requests and grants."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.config.schema import Model, Variant
from gateway.models import Needs, PromptShape, Selection

if TYPE_CHECKING:
    from gateway.engine.manager import EngineInstance

_lease_ids = itertools.count(1)


@dataclass(eq=False)
class PendingRequest:
    """A request waiting for an engine; it may come back (requeued) and keeps its place."""

    request_id: str
    model: Model
    kind: str  # "chat", "completion", "embedding", ... (see server/endpoints.py)
    shape: PromptShape
    reserve: int  # the answer's tokens
    sequences: int = 1  # sequences the engine runs for it: `n` answers times its prompts
    arrived: float = field(default_factory=time.monotonic)
    arrived_wall: float = field(default_factory=time.time)  # the same, as wall time (for views)
    seq: int = 0  # arrival order, set by the supervisor
    exact_tokens: int | None = None  # once counted on an engine of this model
    method: str = "exact"  # how exact_tokens was found: "exact" or "bound"
    logged: Variant | None = None  # the variant of its last logged selection
    future: asyncio.Future[Grant] | None = None

    def needs(self, estimate: int) -> Needs:
        if self.exact_tokens is not None:
            return Needs(self.exact_tokens, self.reserve, self.method, self.sequences)
        return Needs(estimate, self.reserve, "estimate", self.sequences)


@dataclass
class Lease:
    """A grant as the supervisor keeps it, until its holder releases it."""

    pending: PendingRequest
    instance: EngineInstance
    tokens: int  # context it reserves on its engine: its needs, exact once counted
    slots: int = 1  # engine slots its sequences take


@dataclass(frozen=True)
class Grant:
    """A lease on a ready engine: the holder may send one request to it."""

    instance: EngineInstance
    selection: Selection
    lease: int = field(default_factory=lambda: next(_lease_ids))

    @property
    def count_first(self) -> bool:
        """The needs were estimated: count exactly on this engine before forwarding."""
        return not self.selection.needs.exact
