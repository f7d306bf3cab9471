"""Live events (/gateway/events' source): the ring, followers that fall behind, and what
the supervisor publishes as it works."""

from __future__ import annotations

import asyncio
import time

from gateway.supervisor.supervisor import Supervisor
from gateway.utils.live import LiveEvents, LiveKind
from tests.test_supervisor import FakeEffects, ask, make_config, until


def kinds(live: LiveEvents, since: int = 0) -> list[str]:
    return [event.kind.value for event in live.since(since)]


async def test_events_are_numbered_and_a_reconnect_resumes_after_the_last_seen() -> None:
    live = LiveEvents(kept=3)
    for n in range(5):
        live.publish(LiveKind.LOG, {"line": str(n)})
    kept = live.since(0)
    assert [e.data["line"] for e in kept] == ["2", "3", "4"]  # the ring keeps 3
    assert [e.id for e in live.since(kept[1].id)] == [kept[2].id]
    assert kept[0].id > time.time() * 1_000_000 - 60e6  # ids go on from this run's start


async def test_a_follower_that_falls_behind_is_told_how_many_it_lost() -> None:
    live = LiveEvents()
    with live.follow() as follower:
        follower.queue = asyncio.Queue(maxsize=2)
        for n in range(5):
            live.publish(LiveKind.LOG, {"line": str(n)})
        lost = await follower.next()
        assert (lost.kind, lost.data) == (LiveKind.LOST, {"count": 3})
        assert [(await follower.next()).data["line"] for _ in range(2)] == ["0", "1"]
    live.publish(LiveKind.LOG, {"line": "after"})  # no follower left: nothing is offered
    assert follower.queue.empty()


async def test_the_supervisor_publishes_selections_grants_transitions_queue_and_releases() -> None:
    fx = FakeEffects()
    sup = Supervisor(make_config(), fx)
    sup.start()
    try:
        await _serve_one(sup, fx)
    finally:
        await sup.close()


async def _serve_one(sup: Supervisor, fx: FakeEffects) -> None:
    _, task = ask(sup, "a", tokens=600, reserve=100)
    await until(lambda: len(fx.starts) == 1)
    assert kinds(sup.live)[:3] == ["selection", "transition", "queue"]
    queued = sup.live.since(0)[2].data["models"]
    assert queued["a"]["count"] == 1
    fx.starts[0].succeed()
    await until(task.done)
    grant = task.result()
    published = {e.kind.value: e.data for e in sup.live.since(0)}
    assert published["transition"]["to"] == "ready"
    assert published["grant"]["context"] == 2048 and published["grant"]["in_flight"] == 1
    assert published["queue"] == {"models": {}}
    sup.release(grant, served=True)
    await until(lambda: "release" in kinds(sup.live))
    release = next(e.data for e in sup.live.since(0) if e.kind is LiveKind.RELEASE)
    assert (release["served"], release["requeue"], release["in_flight"]) == (True, None, 0)


def test_a_record_reads_tokens_and_speed_from_answers_and_streams() -> None:
    from gateway.server.record import RequestRecord

    whole = RequestRecord("r1", "tiny", "tiny-chat", "/v1/chat/completions", False)
    whole.read_usage(
        b'{"usage":{"prompt_tokens":9,"completion_tokens":7},"timings":{"predicted_per_second":51.5}}'
    )
    assert (whole.completion_tokens, whole.tokens_per_second) == (7, 51.5)

    stream = RequestRecord("r2", "tiny", "tiny", "/v1/completions", True)
    tail = b'data: {"choices":[],"timings":{"predicted_n":12}}\n\ndata: [DONE]\n\n'
    stream.read_usage(tail)
    stream.finish(200, ttft=0.5, duration=1.5)
    assert (stream.completion_tokens, stream.tokens_per_second) == (12, 12.0)  # 12 tokens in 1 s
    assert stream.as_json()["status"] == 200

    silent = RequestRecord("r3", "tiny", "tiny", "/v1/embeddings", False)
    silent.read_usage(b'{"data":[{"embedding":[0.1]}]}')
    silent.finish(200, ttft=0.1, duration=0.1)
    assert (silent.completion_tokens, silent.tokens_per_second) == (None, None)
