"""Engine lifecycle against the real engine: swaps, drains, crashes, idle unload, shutdown."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from gateway.demo.harness import lua_config, spawn_gateway
from gateway.supervisor.supervisor import BACKOFF_BASE
from tests.conftest import Gateway, alive, tiny_model_config, wait_until

CHAT = [{"role": "user", "content": "hi"}]
FAKE_ENGINE = str(Path(__file__).parent / "fakes" / "fake_engine.py")


def ask(gateway: Gateway, model: str, max_tokens: int = 4, **extra):
    return gateway.post(
        "/v1/chat/completions",
        {"model": model, "messages": CHAT, "max_tokens": max_tokens, **extra},
    )


def warm(gateway: Gateway, max_tokens: int) -> None:
    """Start the variant a `max_tokens` request needs without waiting for its answer."""
    gateway.post(
        "/v1/chat/completions",
        {"model": "tiny", "messages": CHAT, "stream": True, "max_tokens": max_tokens},
        headers_only=True,
    )


def in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn(*args, **kwargs)))
    thread.start()
    return thread, result


def swap_path(gateway: Gateway) -> list[str]:
    return [h["to"] for h in gateway.state()["history"]]


@pytest.fixture
def gateway(start_gateway, tiny_models) -> Gateway:
    return start_gateway(tiny_model_config(tiny_models))


def test_swap_between_models_passes_draining_and_stopping(gateway: Gateway) -> None:
    assert ask(gateway, "tiny").status == 200
    first_pid = gateway.engine()["pid"]
    assert ask(gateway, "tiny-b").status == 200
    state, engine = gateway.state(), gateway.engine()
    assert engine["model"] == "tiny-b" and engine["pid"] != first_pid
    assert swap_path(gateway) == [
        "starting",
        "ready",
        "draining",
        "stopping",
        "idle",
        "starting",
        "ready",
    ]
    assert state["counters"]["starts"] == 2
    wait_until(lambda: not alive(first_pid), timeout=5)
    assert re.search(
        r"swap to tiny-b@2048 done in \d+ ms: drain \d+ ms, stop \d+ ms, start \d+ ms", gateway.log()
    )


def test_in_flight_stream_finishes_before_the_swap_stops_its_engine(start_gateway, tiny_models) -> None:
    # A drain_timeout no stream here takes (3000 tokens took 5-6 s on a busy 2-core machine).
    gateway = start_gateway(tiny_model_config(tiny_models), drain_timeout=120)
    warm(gateway, 3000)
    wait_until(lambda: gateway.state()["in_flight"] == 0)  # warm's own request has ended
    pid = gateway.engine()["pid"]
    body = {
        "model": "tiny",
        "messages": CHAT,
        "max_tokens": 3000,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    req = urllib.request.Request(
        gateway.url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.readline().startswith(b"data: ")  # the stream is under way
        other, answered = in_thread(lambda: (ask(gateway, "tiny-b"), time.monotonic()))
        wait_until(lambda: gateway.state()["queued"]["count"] == 1, interval=0.002)
        engine = gateway.engine()
        assert (engine["state"], engine["in_flight"], engine["pid"]) == ("draining", 1, pid)  # the swap waits
        rest = resp.read().decode()
        ended = time.monotonic()
    other.join(30)
    events = [e for e in rest.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]", rest[-500:]  # not cut off
    usage = [u for e in events[:-1] if (u := json.loads(e[6:]).get("usage"))]
    assert usage[-1]["completion_tokens"] == 3000
    assert '"finish_reason":"length"' in rest.replace(" ", "")
    (swapped, swapped_at) = answered[0]
    assert swapped.status == 200 and swapped_at > ended  # served only after the stream ended
    history = gateway.state()["history"]
    drain = next(h for h in history if h["trigger"] == "drain")
    drained = next(h for h in history if h["trigger"] == "drained")
    assert drain["reason"].startswith("swap to tiny-b@2048")
    assert drained["reason"] == "no request in flight"


def test_queued_requests_are_granted_together_after_a_swap(gateway: Gateway) -> None:
    warm(gateway, 2000)
    blocker, _ = in_thread(ask, gateway, "tiny", max_tokens=2000)
    wait_until(lambda: gateway.state()["in_flight"] == 1, interval=0.002)
    waiting = [in_thread(ask, gateway, "tiny-b") for _ in range(4)]
    wait_until(lambda: gateway.state()["queued"]["count"] == 4, interval=0.002)
    assert gateway.state()["queued"]["models"] == {"tiny-b": 4}
    for thread, _ in waiting:
        thread.join(30)
    blocker.join(30)
    assert [r[0].status for _, r in waiting] == [200] * 4
    assert gateway.state()["counters"]["starts"] == 2  # one swap served all four


def test_a_b_a_b_during_a_swap_causes_no_extra_swaps(gateway: Gateway) -> None:
    warm(gateway, 2000)
    blocker, _ = in_thread(ask, gateway, "tiny", max_tokens=2000)
    wait_until(lambda: gateway.state()["in_flight"] == 1, interval=0.002)
    threads = []
    for model in ("tiny-b", "tiny", "tiny-b", "tiny"):
        threads.append(in_thread(ask, gateway, model))
        queued = len(threads)
        wait_until(lambda n=queued: gateway.state()["queued"]["count"] == n, interval=0.002)
    for thread, _ in threads:
        thread.join(30)
    blocker.join(30)
    assert all(r[0].status == 200 for _, r in threads)
    # tiny (running) -> tiny-b (both b's) -> tiny (both a's): two swaps, not four.
    assert gateway.state()["counters"]["starts"] == 3


def test_engine_killed_mid_stream_then_the_next_request_recovers(gateway: Gateway) -> None:
    warm(gateway, 5000)
    pid = gateway.engine()["pid"]
    body = json.dumps({"model": "tiny", "messages": CHAT, "max_tokens": 5000, "stream": True})
    req = urllib.request.Request(
        gateway.url + "/v1/chat/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req) as resp:
        resp.readline()
        os.kill(pid, signal.SIGKILL)
        rest = resp.read().decode()
    assert "data: [DONE]" not in rest
    assert '"error"' in rest  # the stream ends with an error event
    wait_until(lambda: gateway.engine()["state"] == "crashed")
    assert gateway.state()["counters"]["crashes"] == 1
    again = ask(gateway, "tiny")
    assert again.status == 200
    assert gateway.engine()["pid"] != pid
    assert [h["trigger"] for h in gateway.state()["history"]][-3:] == ["died", "start", "healthy"]


def test_idle_engine_is_unloaded(start_gateway, tiny_models) -> None:
    gateway = start_gateway(tiny_model_config(tiny_models), engine_idle_timeout=0.5)
    ask(gateway, "tiny")
    pid = gateway.engine()["pid"]
    wait_until(lambda: gateway.engine()["state"] == "idle", timeout=5)
    history = gateway.state()["history"]
    assert history[-3]["trigger"] == "drain" and history[-3]["reason"].startswith("idle")
    assert not alive(pid)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_no_engine_outlives_the_gateway(gateway: Gateway, sig: int) -> None:
    ask(gateway, "tiny")
    pid = gateway.engine()["pid"]
    assert alive(pid)
    code = gateway.stop(sig)
    assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    wait_until(lambda: not alive(pid), timeout=5)


def test_sigterm_lets_an_in_flight_request_finish(gateway: Gateway) -> None:
    warm(gateway, 2000)
    long, result = in_thread(ask, gateway, "tiny", max_tokens=2000)
    wait_until(lambda: gateway.state()["in_flight"] == 1, interval=0.002)
    gateway.process.send_signal(signal.SIGTERM)
    long.join(30)
    assert result[0].status == 200
    assert result[0].json()["usage"]["completion_tokens"] == 2000
    assert gateway.process.wait(10) == 0


def fake_model(mode: str, **extra) -> dict:
    return {
        "name": f"fake-{mode}",
        "binary": FAKE_ENGINE,
        "args": [mode],
        "variants": [{"context": 1024}],
        **extra,
    }


def test_engine_never_healthy_gets_504_and_nothing_hangs(start_gateway, tiny_models) -> None:
    models = [
        fake_model("never-healthy", engine_startup_timeout=1),
        *tiny_model_config(tiny_models),
    ]
    gateway = start_gateway(models)
    started = time.monotonic()
    resp = ask(gateway, "fake-never-healthy")
    assert resp.status == 504 and "not healthy after 1s" in resp.json()["error"]["message"]
    assert time.monotonic() - started < 5
    assert gateway.engine()["state"] == "crashed"
    assert ask(gateway, "tiny").status == 200  # other models keep working


def test_engine_exiting_on_start_gets_502_with_its_output(start_gateway, tiny_models) -> None:
    gateway = start_gateway([fake_model("exit-on-start"), *tiny_model_config(tiny_models)])
    resp = ask(gateway, "fake-exit-on-start")
    assert resp.status == 502
    message = resp.json()["error"]["message"]
    assert "exited with code 3" in message and "cannot load model" in message


def test_missing_binary_is_a_clear_503(start_gateway, tiny_models) -> None:
    missing = {
        "name": "ghost",
        "binary": "/nonexistent/llama-server",
        "variants": [{"context": 512}],
    }
    gateway = start_gateway([missing, *tiny_model_config(tiny_models)])
    resp = ask(gateway, "ghost")
    assert resp.status == 503 and "/nonexistent/llama-server" in resp.json()["error"]["message"]


def test_crash_loop_backs_off_then_gives_503_while_others_work(start_gateway, tiny_models) -> None:
    gateway = start_gateway(
        [fake_model("crash-on-request"), *tiny_model_config(tiny_models)], max_start_failures=2
    )
    first, first_answer = in_thread(ask, gateway, "fake-crash-on-request")
    wait_until(lambda: gateway.state()["counters"].get("starts") == 1, interval=0.002)
    # The fake engine has one slot: this one waits behind `first` (in flight, and back
    # in the queue ahead of it after each crash) until max_start_failures crashes in a
    # row of that variant fail its waiters.
    waiting, waiting_answer = in_thread(ask, gateway, "fake-crash-on-request")
    first.join(30)
    waiting.join(30)
    assert first_answer[0].status == 502  # crashed twice under the same request: no third try
    refused = waiting_answer[0]
    assert refused.status == 503, refused.body[:500]
    message = refused.json()["error"]["message"]
    assert "keeps failing (2 times in a row)" in message and "crashing on request" in message

    steps = [h for h in gateway.state()["history"] if h["trigger"] in ("start", "died", "reset")]
    assert [h["trigger"] for h in steps] == ["start", "died", "start", "died", "reset"]
    died, restart = steps[1], steps[2]
    assert restart["monotonic"] - died["monotonic"] >= BACKOFF_BASE > 0  # backed off
    assert steps[-1]["reason"] == "fake-crash-on-request@1024: 2 failures in a row"
    state = gateway.state()
    assert state["counters"]["crashes"] == 2
    assert "crashing on request" in "\n".join(state["engine_log"])
    assert ask(gateway, "tiny").status == 200


def test_an_engine_exiting_on_start_is_started_once_per_request(start_gateway, tiny_models) -> None:
    gateway = start_gateway([fake_model("exit-on-start"), *tiny_model_config(tiny_models)])
    assert ask(gateway, "fake-exit-on-start").status == 502
    state = gateway.state()
    assert (state["counters"]["starts"], state["counters"]["start_failures"]) == (1, 1)
    assert "abort" not in [h["trigger"] for h in state["history"]]


def test_drain_timeout_cuts_off_requests_in_flight_at_once(start_gateway, tiny_models) -> None:
    gateway = start_gateway(tiny_model_config(tiny_models), drain_timeout=0.3)
    warm(gateway, 4000)  # tiny@8192: room for two requests of 4000 tokens at once
    body = json.dumps({"model": "tiny", "messages": CHAT, "max_tokens": 4000, "stream": True})
    req = urllib.request.Request(
        gateway.url + "/v1/chat/completions", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    plain, plain_result = in_thread(ask, gateway, "tiny", max_tokens=4000)
    with urllib.request.urlopen(req) as resp:
        resp.readline()
        wait_until(lambda: gateway.state()["in_flight"] == 2, interval=0.002)
        started = time.monotonic()
        swap, swap_result = in_thread(ask, gateway, "tiny-b")
        rest = resp.read().decode()
        cut_after = time.monotonic() - started
    plain.join(30)
    swap.join(30)
    swapped_after = time.monotonic() - started
    assert cut_after < 1.0  # 0.3 s of drain, not the rest of the generation
    # Stopped on SIGTERM once idle, or killed at once if the non-stream still decodes
    # there: never the stop_timeout (5 s) of a SIGTERM that hangs.
    assert swapped_after < 2.5
    assert "ignored SIGTERM" not in gateway.log()
    assert "drain_timeout" in rest and "data: [DONE]" not in rest
    assert plain_result[0].status == 502  # cut off, not run again
    assert "drain_timeout" in plain_result[0].json()["error"]["message"]
    assert swap_result[0].status == 200
    assert gateway.state()["counters"]["starts"] == 2  # no swap back for a re-run


def stopped_line(gateway: Gateway, key: str) -> str:
    return next(line for line in gateway.log().splitlines() if f"engine stopped {key}" in line)


def test_an_engine_whose_cut_off_streams_ended_stops_on_sigterm(start_gateway, tiny_models) -> None:
    gateway = start_gateway(tiny_model_config(tiny_models), drain_timeout=0.3)
    warm(gateway, 4000)
    streams = [in_thread(ask, gateway, "tiny", max_tokens=4000, stream=True) for _ in range(2)]
    wait_until(lambda: gateway.state()["in_flight"] == 2, interval=0.002)
    assert ask(gateway, "tiny-b").status == 200
    for thread, _ in streams:
        thread.join(30)
    assert all("drain_timeout" in answer[0].body.decode() for _, answer in streams)
    # llama-server ends a stream whose client left at once: the stop finds it idle.
    assert "exit=0" in stopped_line(gateway, "tiny@8192")
    assert "SIGKILL" not in gateway.log()


def test_an_engine_still_decoding_a_cut_off_request_is_killed_at_once(start_gateway, tiny_models) -> None:
    # llama-server decodes a non-stream whose client left on to its max_tokens, and a
    # SIGTERM mid-decode can deadlock it: after the settle wait (1 s) it is SIGKILLed.
    gateway = start_gateway(tiny_model_config(tiny_models, variants=[{"context": 32768}]), drain_timeout=0.3)
    warm(gateway, 30000)
    plain, plain_result = in_thread(ask, gateway, "tiny", max_tokens=30000)
    wait_until(lambda: gateway.state()["in_flight"] == 1, interval=0.002)
    started = time.monotonic()
    assert ask(gateway, "tiny-b").status == 200
    swapped_after = time.monotonic() - started
    plain.join(30)
    assert plain_result[0].status == 502
    log = gateway.log()
    assert "tiny@32768 pid" in log and "still decodes a request whose client is gone: SIGKILL" in log
    assert "exit=-9" in stopped_line(gateway, "tiny@32768")
    assert swapped_after < 2.5  # drain_timeout and the settle wait, not a stop_timeout (5 s)


def test_a_gateway_that_cannot_listen_says_so_and_exits_at_once(tmp_path, tiny_models) -> None:
    """Its address taken: exit 3 with the reason, without waiting out a shutdown budget."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "taken.cfg.lua"
        config.write_text(lua_config(port, tiny_model_config(tiny_models)))
        log = tmp_path / "taken.log"
        began = time.monotonic()
        code = spawn_gateway(config, log).wait(30)
    assert code == 3
    assert time.monotonic() - began < 10
    assert "cannot start" in log.read_text() and "address already in use" in log.read_text()
