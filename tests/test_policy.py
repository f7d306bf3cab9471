"""plan(): the pure queue policy over waiting requests and the engine's state."""

from __future__ import annotations

import pytest

from gateway.config.schema import Model, RequestRules, Timeouts, Variant
from gateway.models import ModelSelector, Needs, RunningEngine
from gateway.models.selector import Outcome
from gateway.supervisor.policy import EngineView, Waiting, plan

TIMEOUTS = Timeouts(health_check=0.05, startup=0.05, drain=0.05, stop=0.05, idle=0)


def make_model(name: str, *contexts: int) -> Model:
    variants = tuple(Variant(name, c, (), None, TIMEOUTS) for c in sorted(contexts))
    return Model(name, (), "llamacpp", None, (), {}, 256, RequestRules(), variants)


A = make_model("a", 512, 2048, 8192)
B = make_model("b", 1024)
SELECTOR = ModelSelector()


def waiting(seq: int, model: Model, total: int = 200, method: str = "exact") -> Waiting:
    return Waiting(seq, model, Needs(total - 100, 100, method))


def ready(model: Model, context: int) -> EngineView:
    variant = model.variant_for(context)
    assert variant is not None
    return EngineView("ready", RunningEngine(variant, context))


def seqs(pairs) -> list[int]:
    return [item.seq for item, _ in pairs]


def test_ready_engine_grants_every_servable_request_in_arrival_order() -> None:
    queue = [waiting(1, A), waiting(2, A, 400), waiting(3, A, 2048, "estimate")]
    result = plan(queue, ready(A, 2048), SELECTOR)
    assert seqs(result.grants) == [1, 2, 3]
    assert all(sel.outcome is Outcome.REUSED for _, sel in result.grants)
    assert result.next is None and result.rejects == []


def test_abab_with_a_ready_grants_both_a_and_b_is_next() -> None:
    queue = [waiting(1, A), waiting(2, B), waiting(3, A), waiting(4, B)]
    result = plan(queue, ready(A, 512), SELECTOR)
    assert seqs(result.grants) == [1, 3]
    assert result.next is not None
    item, selection = result.next
    assert item.seq == 2
    assert selection.outcome is Outcome.STARTED
    assert selection.variant == B.variant_for(1024)


def test_next_is_the_first_non_servable_even_when_it_is_an_upgrade() -> None:
    # Request 1 needs more than the running 512; request 3 (B) is later: 1 decides.
    queue = [waiting(1, A, 1000), waiting(2, A), waiting(3, B)]
    result = plan(queue, ready(A, 512), SELECTOR)
    assert seqs(result.grants) == [2]
    assert result.next is not None
    item, selection = result.next
    assert item.seq == 1
    assert selection.outcome is Outcome.UPGRADED
    assert selection.variant == A.variant_for(2048)


def test_rejects_what_no_variant_fits_whatever_the_state() -> None:
    queue = [waiting(1, A, 9000), waiting(2, B, 1025, "bound"), waiting(3, A)]
    for engine in (EngineView("idle", None), ready(A, 8192), EngineView("starting", None)):
        result = plan(queue, engine, SELECTOR)
        assert seqs(result.rejects) == [1, 2]
        assert all(sel.outcome is Outcome.REJECTED for _, sel in result.rejects)
        assert 3 in seqs(result.grants) or (result.next and result.next[0].seq == 3)


def test_an_estimate_is_never_rejected() -> None:
    result = plan([waiting(1, A, 100_000, "estimate")], EngineView("idle", None), SELECTOR)
    assert result.rejects == []
    assert result.next is not None and result.next[1].variant == A.variant_for(8192)


@pytest.mark.parametrize("state", ["idle", "starting", "draining", "stopping", "crashed"])
def test_nothing_is_granted_unless_ready(state: str) -> None:
    variant = A.variant_for(2048)
    assert variant is not None
    # Even with a running engine handed in, only "ready" grants.
    engine = EngineView(state, RunningEngine(variant, 2048))
    queue = [waiting(1, A), waiting(2, B)]
    result = plan(queue, engine, SELECTOR)
    assert result.grants == []
    assert result.next is not None and result.next[0].seq == 1
    assert result.next[1].outcome is Outcome.STARTED
    assert result.next[1].variant == A.variant_for(512)


def test_empty_queue_plans_nothing() -> None:
    result = plan([], ready(A, 512), SELECTOR)
    assert result.grants == [] and result.rejects == [] and result.next is None


def test_a_shared_cache_grants_in_order_while_tokens_are_free() -> None:
    a = make_model("a", 512)
    running = RunningEngine(a.variants[0], 512)
    queue = [waiting(1, a, 300), waiting(2, a, 300), waiting(3, a, 10)]
    busy = plan(queue, EngineView("ready", running, free_tokens=400, idle=False), ModelSelector())
    assert [w.seq for w, _ in busy.grants] == [1]  # 2 does not fit; 3 keeps behind it
    assert busy.next is None
    idle = plan(
        [waiting(1, a, 500)], EngineView("ready", running, free_tokens=100, idle=True), ModelSelector()
    )
    assert [w.seq for w, _ in idle.grants] == [1]  # an idle engine always takes one
