"""A frozen engine (#10, item 5) against the real llama-server, stopped with SIGSTOP as a
driver fault or a swap storm would leave it: detected by the health probe, killed,
marked crashed and replaced; what it held is retried or ended, never left hanging."""

from __future__ import annotations

import json
import os
import signal
import urllib.request

import pytest

from tests.conftest import Gateway, alive, tiny_model_config, wait_until

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
def gateway(start_gateway, tiny_models) -> Gateway:
    return start_gateway(tiny_model_config(tiny_models), health_check_timeout=0.5)


def frozen_engine(gateway: Gateway) -> int:
    assert gateway.post("/gateway/load", {"model": "tiny"}).status == 200
    pid = gateway.engine()["pid"]
    os.kill(pid, signal.SIGSTOP)
    return pid


def test_a_request_on_a_frozen_engine_is_retried_on_a_new_one(gateway: Gateway) -> None:
    pid = frozen_engine(gateway)
    reply = gateway.post(
        "/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 8}, timeout=30
    )
    assert reply.status == 200, reply.body[:300]
    state, engine = gateway.state(), gateway.engine()
    assert engine["state"] == "ready" and engine["pid"] != pid
    wait_until(lambda: not alive(pid), timeout=5)
    died = [h for h in state["history"] if h["trigger"] == "died"]
    assert died and "frozen" in died[-1]["reason"] and str(pid) in died[-1]["reason"]
    assert state["counters"]["frozen"] == 1


def test_a_stream_on_an_engine_that_freezes_ends_with_an_error_event(gateway: Gateway) -> None:
    assert gateway.post("/gateway/load", {"model": "tiny", "context": 8192}).status == 200
    pid = gateway.engine()["pid"]
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 7000, "stream": True, "temperature": 0}
    request = urllib.request.Request(
        gateway.url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    events: list[bytes] = []
    with urllib.request.urlopen(request, timeout=30) as response:
        events.append(response.readline())  # the first event: the engine is generating
        os.kill(pid, signal.SIGSTOP)
        for line in response:
            if line.startswith(b"data: "):
                events.append(line)
    assert b'"error"' in events[-1] and b"engine" in events[-1], events[-1]
    wait_until(lambda: not alive(pid), timeout=5)
    after = gateway.post("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 4})
    assert after.status == 200 and gateway.engine()["pid"] != pid
