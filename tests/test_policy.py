"""plan() and place(): the pure queue policy and placement over waiting requests and the
engines' states, with limits on engines and memory."""

from __future__ import annotations

import pytest

from gateway.config.schema import EngineKind, Model, RequestRules, Timeouts, Variant
from gateway.models import ModelSelector, Needs, RunningEngine
from gateway.models.selector import Outcome
from gateway.supervisor.machine import EngineState
from gateway.supervisor.policy import EngineView, Limits, Plan, Waiting, excess, plan

TIMEOUTS = Timeouts(health_check=0.05, startup=0.05, drain=0.05, stop=0.05, idle=0)
GiB = 1 << 30


def make_model(name: str, *contexts: int) -> Model:
    variants = tuple(Variant(name, c, (), None, TIMEOUTS) for c in sorted(contexts))
    return Model(name, (), EngineKind.LLAMA_CPP, None, (), {}, 256, RequestRules(), variants)


A = make_model("a", 512, 2048, 8192)
B = make_model("b", 1024)
C = make_model("c", 1024)
SELECTOR = ModelSelector()


def waiting(seq: int, model: Model, total: int = 200, method: str = "exact") -> Waiting:
    return Waiting(seq, model, Needs(total - 100, 100, method))


def ready(model: Model, context: int | None = None, **kwargs) -> EngineView:
    variant = model.variant_for(context) if context else model.variants[0]
    assert variant is not None
    return EngineView(model.name, EngineState.READY, RunningEngine(variant, variant.context), **kwargs)


def engines(*views: EngineView) -> dict[str, EngineView]:
    return {view.model: view for view in views}


def seqs(pairs) -> list[int]:
    return [item.seq for item, _ in pairs]


def gib(variant: Variant) -> int:
    return GiB  # every engine takes 1 GiB in these tests


def start_of(result: Plan) -> tuple[str, tuple[str, ...], bool]:
    assert result.start is not None
    return result.start.variant.key, result.start.evict, result.start.now


# --- the queue ---------------------------------------------------------------------------------


def test_ready_engine_grants_every_servable_request_in_arrival_order() -> None:
    queue = [waiting(1, A), waiting(2, A, 400), waiting(3, A, 2048, "estimate")]
    result = plan(queue, engines(ready(A, 2048)), SELECTOR)
    assert seqs(result.grants) == [1, 2, 3]
    assert all(sel.outcome is Outcome.REUSED for _, sel in result.grants)
    assert result.start is None and result.rejects == []


def test_abab_with_one_engine_grants_the_as_and_drains_a_for_b() -> None:
    queue = [waiting(1, A), waiting(2, B), waiting(3, A), waiting(4, B)]
    result = plan(queue, engines(ready(A, 512)), SELECTOR)
    assert seqs(result.grants) == [1, 3]
    assert start_of(result) == ("b@1024", ("a",), False)
    assert result.start is not None and result.start.head is not None
    assert result.start.head[0].seq == 2 and result.start.head[1].outcome is Outcome.STARTED


def test_abab_with_two_engines_starts_b_beside_a() -> None:
    queue = [waiting(1, A), waiting(2, B), waiting(3, A), waiting(4, B)]
    result = plan(queue, engines(ready(A, 512)), SELECTOR, limits=Limits(max_engines=2))
    assert seqs(result.grants) == [1, 3]
    assert start_of(result) == ("b@1024", (), True)


def test_the_first_request_needing_a_start_decides_even_an_upgrade() -> None:
    # Request 1 needs more than the running 512; request 3 (B) is later: 1 decides.
    queue = [waiting(1, A, 1000), waiting(2, A), waiting(3, B)]
    result = plan(queue, engines(ready(A, 512)), SELECTOR, limits=Limits(max_engines=2))
    assert seqs(result.grants) == [2]
    assert start_of(result) == ("a@2048", ("a",), False)  # the model replaces its own engine
    assert result.start is not None and result.start.head is not None
    assert result.start.head[1].outcome is Outcome.UPGRADED


def test_rejects_what_no_variant_fits_whatever_the_state() -> None:
    queue = [waiting(1, A, 9000), waiting(2, B, 1025, "bound"), waiting(3, A)]
    for view in (EngineView("a", EngineState.IDLE), ready(A, 8192), EngineView("a", EngineState.STARTING)):
        result = plan(queue, engines(view), SELECTOR)
        assert seqs(result.rejects) == [1, 2]
        assert all(sel.outcome is Outcome.REJECTED for _, sel in result.rejects)


def test_an_estimate_is_never_rejected() -> None:
    result = plan([waiting(1, A, 100_000, "estimate")], {}, SELECTOR)
    assert result.rejects == []
    assert start_of(result) == ("a@8192", (), True)


@pytest.mark.parametrize("state", [EngineState.STARTING, EngineState.DRAINING, EngineState.STOPPING])
def test_requests_for_an_engine_in_transition_wait_for_it(state: EngineState) -> None:
    queue = [waiting(1, A), waiting(2, B)]
    result = plan(queue, engines(EngineView("a", state, memory=GiB)), SELECTOR, limits=Limits(max_engines=2))
    assert result.grants == []
    assert start_of(result) == ("b@1024", (), True)  # b starts meanwhile: a start blocks nobody else


@pytest.mark.parametrize("state", [EngineState.IDLE, EngineState.CRASHED])
def test_a_model_with_no_engine_starts_its_smallest_sufficient_variant(state: EngineState) -> None:
    result = plan([waiting(1, A, 1000)], engines(EngineView("a", state)), SELECTOR)
    assert start_of(result) == ("a@2048", (), True)


def test_empty_queue_plans_nothing() -> None:
    result = plan([], engines(ready(A, 512)), SELECTOR)
    assert result.grants == [] and result.rejects == [] and result.start is None


def test_a_shared_cache_grants_in_order_while_tokens_are_free() -> None:
    a = make_model("a", 512)
    queue = [waiting(1, a, 300), waiting(2, a, 300), waiting(3, a, 10)]
    busy = plan(queue, engines(ready(a, free_tokens=400, idle=False)), SELECTOR)
    assert seqs(busy.grants) == [1]  # 2 does not fit; 3 keeps behind it
    assert busy.start is None
    idle = plan([waiting(1, a, 500)], engines(ready(a, free_tokens=100, idle=True)), SELECTOR)
    assert seqs(idle.grants) == [1]  # an idle engine always takes one


def test_a_full_engine_holds_back_its_own_requests_only() -> None:
    queue = [waiting(1, A, 300), waiting(2, B), waiting(3, A, 10)]
    views = engines(ready(A, 512, free_tokens=100, idle=False), ready(B))
    result = plan(queue, views, SELECTOR, limits=Limits(max_engines=2))
    assert seqs(result.grants) == [2]


def test_a_backing_off_variant_does_not_hold_up_another() -> None:
    queue = [waiting(1, A), waiting(2, B)]
    result = plan(queue, {}, SELECTOR, backing_off={"a@512"})
    assert start_of(result) == ("b@1024", (), True)
    alone = plan([waiting(1, A)], {}, SELECTOR, backing_off={"a@512"})
    assert start_of(alone) == ("a@512", (), True)  # (the supervisor waits out the back-off)


# --- placement ---------------------------------------------------------------------------------


def test_the_least_recently_used_idle_engine_makes_room() -> None:
    views = engines(ready(A, last_used=2.0), ready(B, last_used=1.0))
    result = plan([waiting(1, C)], views, SELECTOR, limits=Limits(max_engines=2))
    assert start_of(result) == ("c@1024", ("b",), False)


def test_a_busy_engine_is_not_evicted_while_an_idle_one_will_do() -> None:
    views = engines(ready(A, last_used=1.0, idle=False), ready(B, last_used=2.0))
    result = plan([waiting(1, C)], views, SELECTOR, limits=Limits(max_engines=2))
    assert start_of(result) == ("c@1024", ("b",), False)


def test_an_engine_granted_in_the_same_plan_is_busy() -> None:
    views = engines(ready(A, last_used=1.0), ready(B, last_used=2.0))
    result = plan([waiting(1, A), waiting(2, C)], views, SELECTOR, limits=Limits(max_engines=2))
    assert seqs(result.grants) == [1]
    assert start_of(result) == ("c@1024", ("b",), False)


def test_keep_loaded_is_never_evicted() -> None:
    views = engines(ready(A, last_used=1.0, keep_loaded=True), ready(B, last_used=2.0))
    result = plan([waiting(1, C)], views, SELECTOR, limits=Limits(max_engines=2))
    assert start_of(result) == ("c@1024", ("b",), False)


def test_only_the_head_of_the_queue_drains_busy_engines() -> None:
    views = engines(ready(A, 512, free_tokens=0, idle=False), ready(B, idle=False))
    # 1 waits for room on a; 2 is not the head: it may not drain the busy engines
    queue = [waiting(1, A, 300), waiting(2, C)]
    assert plan(queue, views, SELECTOR, limits=Limits(max_engines=2)).start is None
    # as the head it drains the least recently used
    head = plan([waiting(2, C)], views, SELECTOR, limits=Limits(max_engines=2))
    assert start_of(head) == ("c@1024", ("a",), False)


def test_engines_already_leaving_free_their_room_first() -> None:
    views = engines(ready(A, last_used=1.0), EngineView("b", EngineState.STOPPING, memory=GiB))
    result = plan([waiting(1, C)], views, SELECTOR, limits=Limits(max_engines=2))
    assert start_of(result) == ("c@1024", (), False)  # nothing more to evict: wait for b


def test_the_memory_budget_evicts_until_the_new_engine_fits() -> None:
    views = engines(ready(A, memory=GiB, last_used=1.0), ready(B, memory=GiB, last_used=2.0))
    limits = Limits(max_engines=3, memory_budget=2 * GiB)
    result = plan([waiting(1, C)], views, SELECTOR, limits=limits, footprint=gib)
    assert start_of(result) == ("c@1024", ("a",), False)
    roomy = Limits(max_engines=3, memory_budget=3 * GiB)
    assert start_of(plan([waiting(1, C)], views, SELECTOR, limits=roomy, footprint=gib)) == (
        "c@1024",
        (),
        True,
    )


def test_a_request_that_can_never_fit_is_answered_at_once() -> None:
    views = engines(ready(A, memory=2 * GiB, keep_loaded=True))
    limits = Limits(max_engines=3, memory_budget=2 * GiB)
    result = plan([waiting(1, B)], views, SELECTOR, limits=limits, footprint=gib)
    assert result.start is None
    [(item, why)] = result.unfit
    assert item.seq == 1
    assert "b@1024 needs 1.0 GiB" in why and "2.0 GiB" in why and "a 2.0 GiB" in why


def test_a_load_starts_when_the_queue_needs_nothing() -> None:
    b = B.variants[0]
    assert start_of(plan([], {}, SELECTOR, loads=[b])) == ("b@1024", (), True)
    loaded = plan([], engines(ready(B)), SELECTOR, loads=[b])
    assert loaded.start is None
    # the queue goes first
    result = plan([waiting(1, A)], {}, SELECTOR, loads=[b])
    assert start_of(result) == ("a@512", (), True)


def test_what_idle_slots_keep_is_erased_before_a_grant_that_needs_the_room() -> None:
    a = make_model("a", 1024)
    queue = [waiting(1, a, 500)]
    kept = ready(a, free_tokens=1000, idle=False, residue=600)
    result = plan(queue, engines(kept), SELECTOR)
    assert result.grants == [] and result.clear == {"a"}  # 500 > 1000 - 600
    erasing = ready(a, free_tokens=1000, idle=False, residue=600, clearing=True)
    assert plan(queue, engines(erasing), SELECTOR).clear == set()  # one erase at a time
    assert seqs(
        plan(queue, engines(ready(a, free_tokens=1000, idle=False, residue=400)), SELECTOR).grants
    ) == [1]
    # an idle engine takes one whatever its slots keep (alone, its prompt clears its slot)
    assert seqs(plan(queue, engines(ready(a, free_tokens=1000, residue=900)), SELECTOR).grants) == [1]
    # too large even with nothing kept: it waits for requests in flight, no erase
    full = plan([waiting(1, a, 1000)], engines(ready(a, free_tokens=600, idle=False, residue=300)), SELECTOR)
    assert full.grants == [] and full.clear == set()


# --- upstreams (engine = "remote") ---------------------------------------------------------------


def make_remote(name: str, *contexts: int) -> Model:
    variants = tuple(Variant(name, c, (), None, TIMEOUTS, engine=EngineKind.REMOTE) for c in sorted(contexts))
    return Model(name, (), EngineKind.REMOTE, None, (), {}, 256, RequestRules(), variants)


R = make_remote("r", 4096)


def test_an_upstream_starts_beside_a_full_machine() -> None:
    """max_engines 1 and the budget taken by a busy local engine: the upstream still starts."""
    result = plan(
        [waiting(1, R)],
        engines(ready(A, 512, idle=False, memory=GiB)),
        SELECTOR,
        limits=Limits(max_engines=1, memory_budget=GiB),
        footprint=lambda v: 0 if not v.engine.local else GiB,
    )
    assert start_of(result) == ("r@4096", (), True)


def test_a_running_upstream_takes_no_engine_place() -> None:
    remote = EngineView("r", EngineState.READY, RunningEngine(R.variants[0], 4096), idle=False, local=False)
    result = plan([waiting(1, B)], engines(remote), SELECTOR, limits=Limits(max_engines=1))
    assert start_of(result) == ("b@1024", (), True)  # nothing evicted


def test_an_upstream_is_never_excess() -> None:
    remote = EngineView("r", EngineState.READY, RunningEngine(R.variants[0], 4096), local=False)
    assert excess(engines(remote, ready(A), ready(B, last_used=1.0)), Limits(max_engines=1)) == ("a",)


def test_a_load_backing_off_does_not_hold_up_another() -> None:
    """Two upstreams probed again with back-off: the one whose back-off is over starts."""
    dead, alive = make_remote("dead", 4096), make_remote("alive", 4096)
    result = plan(
        [],
        {},
        SELECTOR,
        backing_off={"dead@4096"},
        loads=[dead.variants[0], alive.variants[0]],
    )
    assert start_of(result) == ("alive@4096", (), True)
