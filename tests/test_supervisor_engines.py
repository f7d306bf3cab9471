"""Several engines at once (#11), with fake effects: placement under max_engines and a
memory budget, one machine per engine, and what /gateway/state shows of them."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from gateway.config.schema import GatewayConfig, Model
from gateway.errors import Unavailable
from gateway.supervisor.machine import STATES
from gateway.supervisor.supervisor import Supervisor
from tests.test_supervisor import FakeEffects, FakeInstance, ask, handled, make_config, until

GiB = 1 << 30


def config_with(
    max_engines: int = 2,
    budget: int | None = None,
    keep: tuple[str, ...] = (),
    extra: tuple[str, ...] = ("c",),
) -> GatewayConfig:
    base = make_config()
    template = base.models[1]  # "b", one variant of 4096
    models: list[Model] = [*base.models]
    for name in extra:
        variants = tuple(replace(v, model=name) for v in template.variants)
        models.append(replace(template, name=name, variants=variants))
    models = [replace(m, keep_loaded=m.name in keep) for m in models]
    server = replace(base.server, max_engines=max_engines, memory_budget=budget)
    return GatewayConfig(base.source, server, tuple(models))


class Rig:
    def __init__(self, sup: Supervisor, fx: FakeEffects) -> None:
        self.sup, self.fx = sup, fx
        self.engines: dict[str, FakeInstance] = {}

    async def serve(self, model: str) -> None:
        """One request for `model`, answered and released; its engine started if need be."""
        starts = len(self.fx.starts)
        _, task = ask(self.sup, model)
        await handled(self.sup, task)
        if not task.done():
            await until(lambda: len(self.fx.starts) > starts)
            self.engines[model] = self.fx.starts[-1].succeed()
        await until(task.done)
        self.sup.release(task.result(), served=True)
        await self.sup.quiesce()

    def state(self, model: str) -> str:
        return self.sup.slots[model].state.value if model in self.sup.slots else "idle"

    def engines_json(self) -> dict[str, dict]:
        return {e["model"]: e for e in self.sup.snapshot()["engines"]}


@pytest.fixture
def settings() -> dict:
    return {}


@pytest.fixture
async def rig(settings: dict) -> AsyncIterator[Rig]:
    fx = FakeEffects()
    fx.memory.update(settings.pop("memory", {}))
    sup = Supervisor(config_with(**settings), fx)
    sup.start()
    yield Rig(sup, fx)
    for call in fx.starts:
        if not call.future.done():
            call.future.cancel()
    for slot in sup.slots.values():
        for timer in list(slot.timers):
            slot.cancel(timer)
    await sup.close()


async def test_two_resident_models_alternate_without_starts(rig: Rig) -> None:
    for _ in range(10):
        await rig.serve("a")
        await rig.serve("b")
    assert rig.fx.started_keys == ["a@512", "b@4096"]
    assert rig.state("a") == rig.state("b") == "ready"
    assert rig.sup.counters["starts"] == 2 and rig.sup.counters["swaps"] == 0


async def test_a_third_model_evicts_the_least_recently_used_idle_engine(rig: Rig) -> None:
    await rig.serve("a")
    await rig.serve("b")
    await rig.serve("a")  # b is now the least recently used
    await rig.serve("c")
    assert rig.fx.started_keys == ["a@512", "b@4096", "c@4096"]
    assert rig.fx.stops == [rig.engines["b"]]
    assert (rig.state("a"), rig.state("b"), rig.state("c")) == ("ready", "idle", "ready")
    assert rig.sup.counters["evictions"] == 1


async def test_a_busy_engine_is_kept_while_an_idle_one_can_go(rig: Rig) -> None:
    await rig.serve("a")
    await rig.serve("b")
    _, busy = ask(rig.sup, "a")  # a is busy and the most recent: b is idle
    await until(busy.done)
    await rig.serve("c")
    assert rig.fx.stops == [rig.engines["b"]]
    assert rig.state("a") == "ready"
    rig.sup.release(busy.result(), served=True)


@pytest.mark.parametrize("settings", [{"keep": ("a",)}])
async def test_a_keep_loaded_engine_is_never_evicted(rig: Rig) -> None:
    await rig.serve("a")  # a is the least recently used, but kept
    await rig.serve("b")
    await rig.serve("c")
    first_b = rig.engines["b"]
    assert rig.fx.stops == [first_b]
    await rig.serve("b")
    assert rig.fx.stops == [first_b, rig.engines["c"]]
    assert rig.state("a") == "ready"


async def test_busy_engines_drain_for_the_head_of_the_queue(rig: Rig) -> None:
    await rig.serve("a")
    await rig.serve("b")
    _, on_a = ask(rig.sup, "a")
    _, on_b = ask(rig.sup, "b")
    await until(lambda: on_a.done() and on_b.done())
    _, for_c = ask(rig.sup, "c")
    await handled(rig.sup, for_c)
    assert rig.state("a") == "draining" and rig.state("b") == "ready"  # a was used first
    rig.sup.release(on_a.result(), served=True)
    await until(lambda: len(rig.fx.starts) == 3)
    rig.fx.starts[-1].succeed()
    await until(for_c.done)
    assert rig.state("a") == "idle" and rig.state("b") == "ready"
    rig.sup.release(on_b.result(), served=True)


async def test_an_upgrade_replaces_only_its_own_engine(rig: Rig) -> None:
    await rig.serve("a")
    await rig.serve("b")
    _, big = ask(rig.sup, "a", tokens=1500)  # needs a@2048
    await handled(rig.sup, big)
    await until(lambda: len(rig.fx.starts) == 3)
    assert rig.fx.started_keys[-1] == "a@2048" and rig.fx.stops == [rig.engines["a"]]
    await rig.serve("b")  # served meanwhile, while a starts again
    assert len(rig.fx.starts) == 3
    rig.fx.starts[-1].succeed()
    await until(big.done)
    rig.sup.release(big.result(), served=True)
    assert rig.state("b") == "ready"


async def test_a_start_blocks_nobody_else(rig: Rig) -> None:
    await rig.serve("a")
    _, for_b = ask(rig.sup, "b")
    await until(lambda: len(rig.fx.starts) == 2)  # b starting, not answered yet
    await rig.serve("a")
    assert not for_b.done() and rig.state("b") == "starting"
    rig.fx.starts[-1].succeed()
    await until(for_b.done)
    rig.sup.release(for_b.result(), served=True)


@pytest.mark.parametrize("settings", [{"max_engines": 3, "budget": 3 * GiB, "memory": {"c@4096": 2 * GiB}}])
async def test_the_memory_budget_evicts_until_the_new_engine_fits(rig: Rig) -> None:
    rig.fx.memory.update({"a@512": GiB, "b@4096": GiB})
    await rig.serve("a")
    await rig.serve("b")
    assert rig.sup.snapshot()["memory"] == {
        "budget": 3 * GiB,
        "reserved": 2 * GiB,
        "free": GiB,
        "max_engines": 3,
    }
    await rig.serve("c")  # 2 GiB: a (least recently used) goes, b stays
    assert rig.fx.stops == [rig.engines["a"]]
    assert rig.sup.snapshot()["memory"]["reserved"] == 3 * GiB


@pytest.mark.parametrize("settings", [{"max_engines": 3, "budget": 3 * GiB}])
async def test_a_measured_footprint_larger_than_the_estimate_counts(rig: Rig) -> None:
    rig.fx.memory.update({"a@512": GiB, "b@4096": GiB, "c@4096": GiB})
    rig.fx.measured["a@512"] = 2 * GiB  # it took more than predicted
    await rig.serve("a")
    await rig.serve("b")
    entry = rig.engines_json()["a"]["memory"]
    assert entry == {"estimate": GiB, "measured": 2 * GiB, "reserved": 2 * GiB, "declared": False}
    await rig.serve("c")  # 2 + 1 + 1 > 3: a goes
    assert rig.fx.stops == [rig.engines["a"]]
    assert rig.sup.footprint(rig.engines["a"].variant).reserved == 2 * GiB  # remembered


@pytest.mark.parametrize("settings", [{"max_engines": 3, "budget": 2 * GiB, "keep": ("a",)}])
async def test_a_request_that_cannot_fit_gets_503_naming_the_budget(rig: Rig) -> None:
    rig.fx.memory.update({"a@512": GiB, "b@4096": int(1.5 * GiB)})
    await rig.serve("a")
    _, task = ask(rig.sup, "b")
    await until(task.done)
    error = task.exception()
    assert isinstance(error, Unavailable)
    assert "b@4096 needs 1.5 GiB" in error.message and "2.0 GiB" in error.message
    assert "a 1.0 GiB" in error.message
    assert rig.fx.started_keys == ["a@512"]


async def test_unload_one_model_keeps_the_others(rig: Rig) -> None:
    await rig.serve("a")
    await rig.serve("b")
    await asyncio.wait_for(rig.sup.unload("a"), 2)
    assert (rig.state("a"), rig.state("b")) == ("idle", "ready")
    await asyncio.wait_for(rig.sup.unload(), 2)
    assert rig.state("b") == "idle" and rig.sup.snapshot()["engines"] == []


async def test_each_engine_has_its_own_machine_and_the_history_names_them(rig: Rig) -> None:
    await rig.serve("a")
    await rig.serve("b")
    await rig.serve("c")  # evicts a
    a_history = [(r.source, r.dest) for r in rig.sup.slots["a"].lifecycle.history]
    assert a_history == [
        ("idle", "starting"),
        ("starting", "ready"),
        ("ready", "draining"),
        ("draining", "stopping"),
        ("stopping", "idle"),
    ]
    assert [r.trigger for r in rig.sup.slots["c"].lifecycle.history] == ["start", "healthy"]
    models = [entry["model"] for entry in rig.sup.snapshot()["history"]]
    assert models == ["a", "a", "b", "b", "a", "a", "a", "c", "c"]
    engines = rig.engines_json()
    assert sorted(engines) == ["b", "c"]
    assert (
        engines["c"]["history"][-1]["to"] == "ready" and engines["c"]["pid"] == rig.engines["c"].process.pid
    )


async def test_a_load_starts_beside_the_running_engines(rig: Rig) -> None:
    await rig.serve("a")
    variant = rig.sup.config.resolve("b").variants[0]  # type: ignore[union-attr]
    done = rig.sup.load(variant)
    await until(lambda: len(rig.fx.starts) == 2)
    rig.fx.starts[-1].succeed()
    await asyncio.wait_for(done, 2)
    assert rig.state("a") == rig.state("b") == "ready"


async def test_shutdown_stops_every_engine(rig: Rig) -> None:
    await rig.serve("a")
    await rig.serve("b")
    await asyncio.wait_for(rig.sup.shutdown(), 2)
    assert set(rig.fx.stops) == {rig.engines["a"], rig.engines["b"]}
    assert rig.state("a") == rig.state("b") == "idle"


async def test_an_engine_s_memory_gauges_go_with_it(rig: Rig) -> None:
    rig.fx.memory.update({"a@512": GiB})
    rig.fx.measured["a@512"] = 2 * GiB

    def gauge(kind: str) -> float | None:
        labels = {"model": "a", "kind": kind}
        return rig.sup.metrics.registry.get_sample_value("llm_gateway_engine_memory_bytes", labels)

    await rig.serve("a")
    assert (gauge("estimate"), gauge("measured")) == (GiB, 2 * GiB)
    await asyncio.wait_for(rig.sup.unload("a"), 2)
    assert (gauge("estimate"), gauge("measured")) == (None, None)


# --- found by a hostile run against the real gateway ---------------------------------------------


def reloaded(rig: Rig, **server) -> GatewayConfig:
    """The rig's config with other server keys, or with `a`'s 2048 variant changed."""
    config = rig.sup.config
    return replace(config, server=replace(config.server, **server))


async def test_a_request_requeued_after_a_reload_starts_the_variant_as_the_config_now_says(rig: Rig) -> None:
    await rig.serve("a")
    pending, task = ask(rig.sup, "a", tokens=100)
    await until(task.done)
    grant = task.result()
    config = rig.sup.config
    a = config.models[0]
    changed = replace(
        a, variants=tuple(replace(v, args=("--new",)) if v.context == 2048 else v for v in a.variants)
    )
    rig.sup.reload(replace(config, models=(changed, *config.models[1:])))
    await rig.sup.quiesce()
    pending.exact_tokens = 1500  # counted on a@512: it needs a@2048 (requeued, keeps its place)
    rig.sup.release(grant, requeue_reason="upgrade")
    again = asyncio.ensure_future(rig.sup.acquire(pending))
    await until(lambda: len(rig.fx.starts) == 2)
    assert rig.fx.starts[-1].variant.args == ("--new",)
    rig.fx.starts[-1].succeed()
    await until(again.done)
    await rig.sup.quiesce()
    assert rig.state("a") == "ready" and len(rig.fx.starts) == 2  # no restart loop
    rig.sup.release(again.result(), served=True)


async def test_unload_all_is_answered_while_requests_keep_restarting_engines(rig: Rig) -> None:
    await rig.serve("a")
    await rig.serve("b")
    _, on_a = ask(rig.sup, "a")
    await until(on_a.done)
    unloaded = rig.sup.unload()
    _, for_b = ask(rig.sup, "b")  # arrives while b drains: it starts b again after the stop
    await until(lambda: len(rig.fx.starts) == 3)
    assert not unloaded.done()  # a still drains its request
    rig.fx.starts[-1].succeed()
    await until(for_b.done)
    rig.sup.release(on_a.result(), served=True)
    await asyncio.wait_for(unloaded, 2)  # the engines that ran are down; b runs for its request
    assert rig.state("a") == "idle" and rig.state("b") == "ready"
    rig.sup.release(for_b.result(), served=True)


@pytest.mark.parametrize("settings", [{"max_engines": 3, "budget": 2 * GiB, "keep": ("a",)}])
async def test_a_load_that_can_never_fit_gets_503_at_once(rig: Rig) -> None:
    rig.fx.memory.update({"a@512": GiB, "b@4096": int(1.5 * GiB)})
    await rig.serve("a")
    variant = rig.sup.config.resolve("b").variants[0]  # type: ignore[union-attr]
    loading = rig.sup.load(variant)
    with pytest.raises(Unavailable, match="does not fit the memory budget"):
        await asyncio.wait_for(loading, 2)
    assert rig.fx.started_keys == ["a@512"]


async def test_loads_of_the_same_variant_are_all_answered(rig: Rig) -> None:
    variant = rig.sup.config.resolve("b").variants[0]  # type: ignore[union-attr]
    loads = [rig.sup.load(variant) for _ in range(3)]
    await until(lambda: len(rig.fx.starts) == 1)
    rig.fx.starts[0].succeed()
    await asyncio.wait_for(asyncio.gather(*loads), 2)


@pytest.mark.parametrize("settings", [{"max_engines": 3, "budget": 3 * GiB}])
async def test_a_declared_footprint_wins_over_the_measured_one(rig: Rig) -> None:
    config = rig.sup.config
    declared = tuple(
        replace(m, variants=tuple(replace(v, memory=GiB) for v in m.variants)) for m in config.models
    )
    rig.sup.reload(replace(config, models=declared))
    rig.fx.memory.update({"a@512": GiB, "b@4096": GiB, "c@4096": GiB})  # (what the manager gives)
    rig.fx.measured.update({"a@512": 2 * GiB, "b@4096": 2 * GiB})
    await rig.serve("a")
    await rig.serve("b")
    await rig.serve("c")  # 1 + 1 + 1 GiB as declared: all three fit
    assert rig.fx.stops == [] and rig.sup.snapshot()["memory"]["reserved"] == 3 * GiB


@pytest.mark.parametrize("settings", [{"max_engines": 3, "budget": GiB}])
async def test_an_engine_alone_always_fits_even_when_it_measured_more(rig: Rig) -> None:
    rig.fx.memory.update({"a@512": GiB})
    rig.fx.measured["a@512"] = 2 * GiB
    await rig.serve("a")
    await asyncio.wait_for(rig.sup.unload(), 2)
    await rig.serve("a")  # 2 GiB measured > 1 GiB budget, but nothing else runs
    assert rig.fx.started_keys == ["a@512", "a@512"]


async def test_a_reload_lowering_max_engines_stops_the_least_recently_used_idle_engine(rig: Rig) -> None:
    await rig.serve("a")
    await rig.serve("b")
    rig.sup.reload(reloaded(rig, max_engines=1))
    await until(lambda: rig.state("a") == "idle")
    assert rig.state("b") == "ready"


@pytest.mark.parametrize("settings", [{"max_engines": 3, "budget": 3 * GiB}])
async def test_a_reload_changing_only_memory_keeps_the_engine(rig: Rig) -> None:
    rig.fx.memory.update({"a@512": GiB})
    await rig.serve("a")
    config = rig.sup.config
    a = config.models[0]
    bigger = replace(a, variants=tuple(replace(v, memory=2 * GiB) for v in a.variants))
    rig.sup.reload(replace(config, models=(bigger, *config.models[1:])))
    await rig.sup.quiesce()
    assert rig.state("a") == "ready" and rig.fx.stops == []
    assert rig.engines_json()["a"]["memory"]["reserved"] == 2 * GiB


async def test_the_engines_gauge_counts_running_engines_not_crashed_ones(rig: Rig) -> None:
    rig.sup.metrics.watch(rig.sup.snapshot, STATES)
    await rig.serve("a")
    await rig.serve("b")
    rig.engines["b"].crash()
    await until(lambda: rig.state("b") == "crashed")
    assert rig.sup.metrics.registry.get_sample_value("llm_gateway_engines") == 1


async def test_a_load_nobody_awaits_any_more_leaves_no_unseen_exception(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    variant = rig.sup.config.resolve("b").variants[0]  # type: ignore[union-attr]
    rig.sup.load(variant)  # its caller left: nobody awaits it
    await until(lambda: len(rig.fx.starts) == 1)
    await asyncio.wait_for(rig.sup.shutdown(), 2)
    gc.collect()
    assert "never retrieved" not in caplog.text


async def test_a_grant_that_needs_what_idle_slots_keep_waits_for_their_erase(rig: Rig) -> None:
    _, first = ask(rig.sup, "a", tokens=200)  # 300 of a unified 512
    await until(lambda: len(rig.fx.starts) == 1)
    engine = rig.fx.starts[0].succeed(kv_budget=512)
    await until(first.done)
    rig.sup.release(first.result(), served=True)  # its 300 tokens may stay in an idle slot
    _, second = ask(rig.sup, "a", tokens=50)  # 150: granted, the engine was idle
    await until(second.done)
    _, third = ask(rig.sup, "a", tokens=50)  # 150 more: fits 512 - 150, but not beside the 300 kept
    await handled(rig.sup, third)
    await until(lambda: rig.fx.clears == [engine])
    await until(third.done)
    assert rig.sup.counters["idle_slot_clears"] == 1
    assert rig.sup.slots["a"].residue == []
    for task in (second, third):
        rig.sup.release(task.result(), served=True)
