"""Prometheus metrics with prometheus_client, in a registry of the gateway's own."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "llm_gateway"
# Latency buckets from a cached tiny prompt (ms) to a cold start of a large model (minutes).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# The supervisor's counters: name -> (help, labelled by model).
SUPERVISOR_COUNTERS: dict[str, str] = {
    "starts": "Engine starts",
    "start_failures": "Engine starts that never became healthy",
    "crashes": "Engines that exited on their own, or froze, while ready or draining",
    "frozen": "Engines killed because they did not answer /health with requests in flight",
    "unreachable": "Remote engines whose health probe failed while they were ready or draining",
    "rejected_unreachable": "Requests refused at once because their remote engine is unreachable",
    "swaps": "Starts that had to stop engines first (another variant of the model, or evictions)",
    "rejected_no_room": "Requests refused because their engine can never fit the memory budget",
    "idle_unloads": "Engines stopped after engine_idle_timeout",
    "requeued": "Requests sent back to the queue (upgrade after counting, engine failure)",
    "rejected_queue_full": "Requests refused because the queue was full",
    "cancelled_waiting": "Requests whose client left while they waited in the queue",
    "tokens_counted": "Prompt tokens counted exactly on an engine",
    "idle_slot_clears": "Erases of an engine's idle slots so that the next request fits its shared cache",
}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._counters = {
            name: self._counter(name, text, "model") for name, text in SUPERVISOR_COUNTERS.items()
        }
        self.selections = self._counter(
            "selections",
            "Variant selections by outcome (reused, started, upgraded, rejected)",
            "model",
            "outcome",
            "method",
        )
        self.requests = self._counter(
            "requests", "Model requests answered, by status", "model", "endpoint", "status"
        )
        self.duration = self._histogram(
            "request_duration_seconds", "Model requests from arrival to the last byte", "model", "endpoint"
        )
        self.first_byte = self._histogram(
            "time_to_first_byte_seconds", "Model requests from arrival to the first byte", "model", "endpoint"
        )
        self.queue_wait = self._histogram(
            "queue_wait_seconds", "Time from arrival to a lease on a ready engine", "model"
        )
        self.startup = self._histogram(
            "engine_startup_seconds", "Engine spawn to healthy", "model", "context"
        )
        self.evictions = self._counter(
            "evictions", "Engines stopped to make room for another model's (idle or busy)", "model", "reason"
        )
        self.prompt_cache_saves = self._counter(
            "prompt_cache_saves",
            "Engine slots saved to the prompt cache before a stop, by outcome",
            "model",
            "outcome",
        )
        self.prompt_cache_restores = self._counter(
            "prompt_cache_restores",
            "Saved slots restored into an engine for a request, by outcome",
            "model",
            "outcome",
        )
        self.prompt_cache_tokens_restored = self._counter(
            "prompt_cache_tokens_restored", "Prompt tokens restored from the prompt cache", "model"
        )
        self.engine_memory = Gauge(
            f"{PREFIX}_engine_memory_bytes",
            "An engine's memory: estimate (before its start) and measured (after)",
            ["model", "kind"],
            registry=self.registry,
        )

    def _counter(self, name: str, text: str, *labels: str) -> Counter:
        return Counter(f"{PREFIX}_{name}", text, labels, registry=self.registry)

    def _histogram(self, name: str, text: str, *labels: str) -> Histogram:
        return Histogram(f"{PREFIX}_{name}", text, labels, buckets=LATENCY_BUCKETS, registry=self.registry)

    def forget_engine(self, model: str) -> None:
        """A stopped engine takes no memory: its gauges go."""
        for kind in ("estimate", "measured"):
            with contextlib.suppress(KeyError):
                self.engine_memory.remove(model, kind)

    def count(self, name: str, model: str, amount: int = 1) -> None:
        self._counters[name].labels(model=model).inc(amount)

    def watch(self, snapshot: Callable[[], dict[str, Any]], states: list[str]) -> None:
        """Gauges read at scrape time from the supervisor's state."""
        self.registry.register(_StateCollector(snapshot, states))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, Any]], states: list[str]) -> None:
        self._snapshot = snapshot
        self._states = states

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self._snapshot()
        engine = GaugeMetricFamily(
            f"{PREFIX}_engine_state", "1 for each engine's current state", labels=["model", "state"]
        )
        running = GaugeMetricFamily(
            f"{PREFIX}_engine_context", "Context of the running variant", labels=["model"]
        )
        for entry in state["engines"]:
            for name in self._states:
                engine.add_metric([entry["model"], name], 1.0 if entry["state"] == name else 0.0)
            if entry["variant"] is not None and entry["pid"] is not None:
                running.add_metric([entry["model"]], entry["variant"]["context"])
        yield engine
        yield running
        yield GaugeMetricFamily(f"{PREFIX}_queue_depth", "Requests waiting", value=state["queued"]["count"])
        yield GaugeMetricFamily(f"{PREFIX}_in_flight", "Requests holding a lease", value=state["in_flight"])
        live = [e for e in state["engines"] if e["state"] != "crashed"]
        yield GaugeMetricFamily(f"{PREFIX}_engines", "Engines running or starting", value=len(live))
