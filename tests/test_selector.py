"""ModelSelector: the smallest sufficient variant, pure data in and out."""

from __future__ import annotations

import pytest

from gateway.config.schema import EngineKind, Model, RequestRules, Timeouts, Variant
from gateway.models import ModelSelector, Needs, Room, RunningEngine
from gateway.models.selector import Outcome

TIMEOUTS = Timeouts(health_check=0.05, startup=0.05, drain=0.05, stop=0.05, idle=0)


def make_model(name: str, *contexts: int) -> Model:
    variants = tuple(Variant(name, c, (), None, TIMEOUTS) for c in sorted(contexts))
    return Model(name, (), EngineKind.LLAMA_CPP, None, (), {}, 256, RequestRules(), variants)


BIG = make_model("big", 512, 2048, 8192)
SMALL = make_model("small", 1024)


def running(model: Model, context: int, slot_context: int | None = None) -> RunningEngine:
    variant = model.variant_for(context)
    assert variant is not None
    return RunningEngine(variant, slot_context if slot_context is not None else context)


def exact(total: int, reserve: int = 100, method: str = "exact") -> Needs:
    return Needs(total - reserve, reserve, method)


def estimate(total: int, reserve: int = 100) -> Needs:
    return Needs(total - reserve, reserve, "estimate")


@pytest.mark.parametrize(
    ("total", "context"),
    [(1, 512), (512, 512), (513, 2048), (2048, 2048), (2049, 8192), (8192, 8192)],
)
def test_nothing_runs_starts_smallest_sufficient_variant(total: int, context: int) -> None:
    selection = ModelSelector().select(exact(total), BIG, None)
    assert selection.outcome is Outcome.STARTED
    assert selection.variant is not None and selection.variant.context == context
    assert selection.needs.total == total


def test_exact_fit_on_running_engine_is_reused() -> None:
    selection = ModelSelector().select(exact(2048), BIG, running(BIG, 2048))
    assert selection.outcome is Outcome.REUSED
    assert selection.variant == BIG.variant_for(2048)


def test_one_token_over_running_engine_upgrades() -> None:
    selection = ModelSelector().select(exact(2049), BIG, running(BIG, 2048))
    assert selection.outcome is Outcome.UPGRADED
    assert selection.variant == BIG.variant_for(8192)


def test_one_token_over_the_measured_slot_context_upgrades() -> None:
    # The engine reported less per slot than its n_ctx: the measurement decides.
    selection = ModelSelector().select(exact(1025), BIG, running(BIG, 2048, slot_context=1024))
    assert selection.outcome is Outcome.UPGRADED
    assert selection.variant == BIG.variant_for(8192)


def test_running_larger_variant_is_reused_not_downsized() -> None:
    selection = ModelSelector().select(exact(100), BIG, running(BIG, 8192))
    assert selection.outcome is Outcome.REUSED
    assert selection.variant == BIG.variant_for(8192)


def test_too_small_running_engine_upgrades_to_smallest_sufficient() -> None:
    selection = ModelSelector().select(exact(1000), BIG, running(BIG, 512))
    assert selection.outcome is Outcome.UPGRADED
    assert selection.variant == BIG.variant_for(2048)


@pytest.mark.parametrize("method", ["exact", "bound"])
def test_exact_or_bound_needs_over_largest_are_rejected(method: str) -> None:
    selector = ModelSelector()
    for engine in (None, running(BIG, 8192), running(BIG, 512), running(SMALL, 1024)):
        selection = selector.select(exact(8193, method=method), BIG, engine)
        assert selection.outcome is Outcome.REJECTED, engine
        assert selection.variant is None


def test_estimate_over_largest_is_never_rejected_but_goes_to_largest() -> None:
    selector = ModelSelector()
    for engine in (None, running(SMALL, 1024)):
        selection = selector.select(estimate(100_000), BIG, engine)
        assert selection.outcome is Outcome.STARTED
        assert selection.variant == BIG.variant_for(8192)


def test_estimate_with_no_engine_starts_smallest_sufficient() -> None:
    selection = ModelSelector().select(estimate(600), BIG, None)
    assert selection.outcome is Outcome.STARTED
    assert selection.variant == BIG.variant_for(2048)


def test_running_engine_of_the_model_counts_an_estimate_first() -> None:
    # Even an estimate far over the running engine reuses it: it is counted there exactly.
    selector = ModelSelector()
    for needs in (estimate(100), estimate(5000), estimate(100_000)):
        selection = selector.select(needs, BIG, running(BIG, 512))
        assert selection.outcome is Outcome.REUSED
        assert selection.variant == BIG.variant_for(512)
        assert not selection.needs.exact


def test_capacity_function_halving_like_two_slots() -> None:
    selector = ModelSelector(lambda v: Room(v.context // 2))
    assert selector.select(exact(256), BIG, None).variant == BIG.variant_for(512)
    assert selector.select(exact(257), BIG, None).variant == BIG.variant_for(2048)
    assert selector.select(exact(1025), BIG, None).variant == BIG.variant_for(8192)
    assert selector.select(exact(4097), BIG, None).outcome is Outcome.REJECTED
    assert selector.largest_capacity(BIG) == 4096


def test_other_model_running_starts_this_one() -> None:
    selection = ModelSelector().select(exact(100), BIG, running(SMALL, 1024))
    assert selection.outcome is Outcome.STARTED
    assert selection.variant == BIG.variant_for(512)


def test_other_model_with_same_context_is_not_reused() -> None:
    other = make_model("other", 512, 2048, 8192)
    selection = ModelSelector().select(exact(100), BIG, running(other, 512))
    assert selection.outcome is Outcome.STARTED
    assert selection.variant is not None and selection.variant.model == "big"


def test_describe_names_the_decision() -> None:
    text = ModelSelector().select(exact(600), BIG, None).describe()
    assert "needs=600" in text and "context=2048" in text and "started" in text
    rejected = ModelSelector().select(exact(9000), BIG, None).describe()
    assert "variant=none" in rejected and "rejected" in rejected


def test_several_sequences_need_the_room_of_all_on_a_unified_cache() -> None:
    # n=2 answers of "hi" + 200 tokens each: on a unified cache both sequences hold their
    # tokens at once, so 2 x 210 does not fit a 256 context although one does.
    small = make_model("small", 256, 1024)
    unified = ModelSelector(lambda v: Room(v.context, shared=v.context, slots=4))
    two = Needs(10, 200, "exact", sequences=2)
    assert unified.select(two, small, None).variant == small.variant_for(1024)
    assert unified.select(Needs(10, 200, "exact"), small, None).variant == small.variant_for(256)
    # Per-slot caches: each sequence gets a slot of its own, the largest one must fit.
    per_slot = ModelSelector(lambda v: Room(v.context))
    assert per_slot.select(two, small, None).variant == small.variant_for(256)


def test_sequences_beyond_the_slots_wait_inside_the_engine() -> None:
    # Eight answers on an engine with two slots: two run at once, two hold the cache.
    eight = Needs(100, 300, "exact", sequences=8)
    assert Room(1024, shared=1024, slots=2).fits(eight)
    assert not Room(1024, shared=1024, slots=3).fits(eight)
    # Per-slot caches: each sequence needs its own slot's room only.
    assert Room(400, None, 2).fits(eight) and Room(400, None, 2).reservation(eight) == 800


def test_several_sequences_on_a_shared_cache_have_it_to_themselves() -> None:
    # llama-server gives the extra answers idle slots without clearing them first: the
    # gateway clears them, which is safe only while nothing else runs.
    room = Room(4096, shared=4096, slots=4)
    assert room.reservation(Needs(100, 300, "exact", sequences=2)) == 4096
    assert room.slot_use(Needs(100, 300, "exact", sequences=2)) == 4
    assert room.reservation(Needs(100, 300, "exact")) == 400 and room.slot_use(Needs(100, 300)) == 1


def test_a_running_engine_too_small_for_all_sequences_is_upgraded() -> None:
    engine = RunningEngine(BIG.variant_for(512), 512, shared=512, slots=4)  # type: ignore[arg-type]
    selection = ModelSelector(lambda v: Room(v.context, v.context, 4)).select(
        Needs(50, 200, "exact", sequences=3), BIG, engine
    )
    assert selection.outcome is Outcome.UPGRADED and selection.variant == BIG.variant_for(2048)
