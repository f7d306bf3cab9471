"""The `state` event: all a page needs to draw the dashboard from scratch."""

from __future__ import annotations

import time
from typing import Any

from gateway.config import GatewayConfig
from gateway.config.schema import Model
from gateway.server.dashboard.filters import EventFilter
from gateway.server.dashboard.kept import Kept
from gateway.supervisor.supervisor import Supervisor


def state_view(
    supervisor: Supervisor, config: GatewayConfig, kept: Kept, wanted: EventFilter, last_id: int
) -> dict[str, Any]:
    """/gateway/state's snapshot, the configured models (every one gets a card, running or
    not), and the past the page shows: the events up to `last_id` are all in it."""
    return {
        "last_id": last_id,
        "now": time.time(),  # the page's clock may be off: uptimes and waits use this one
        "state": supervisor.snapshot(),
        "models": [_model(model, supervisor) for model in config.models],
        "queue": kept.queue,
        "activity": list(kept.activity),
        "evictions": list(kept.evictions),
        "logs": [line for line in kept.logs if wanted.wants_line(line)],
    }


def _model(model: Model, supervisor: Supervisor) -> dict[str, Any]:
    return {
        "name": model.name,
        "aliases": list(model.aliases),
        "engine": model.engine.value,
        "keep_loaded": model.keep_loaded,
        "variants": [
            {"context": v.context, "memory": supervisor.footprint(v).as_json()} for v in model.variants
        ],
    }
