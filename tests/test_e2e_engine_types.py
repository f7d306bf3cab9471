"""Engine types against real engines: llama-server started as an `openai` command, and a
second llm-gateway as the `remote` upstream of the first."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway, alive, metric, tiny_model_config, wait_until

from gateway.demo.harness import free_port, spawn_gateway, stop_process, wait_healthy

FAKE = Path(__file__).with_name("fakes") / "fake_engine.py"
PROMPT_800 = "word " * 160  # 800 bytes: about 800 tokens on the demo model (one a byte)


def chat(model: str, text: str = "Hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}


def openai_model(llama_server: str, models: dict[str, Path], count: str, **extra: Any) -> dict[str, Any]:
    """tiny, started as any OpenAI-compatible server would be: from a command line."""
    return {
        "name": "tiny-o",
        "aliases": ["tiny-o-chat"],
        "engine": "openai",
        "count": count,
        "command": [
            llama_server,
            "-m",
            str(models["tiny"]),
            "--host",
            "${HOST}",
            "--port",
            "${PORT}",
            "-c",
            "${CONTEXT}",
            "--alias",
            "${MODEL}",
            "-t",
            "1",
        ],
        "default_max_tokens": 32,
        "request": {"defaults": {"temperature": 0}},
        "variants": [{"context": 512}, {"context": 2048}],
        **extra,
    }


def stream_events(
    url: str, body: dict[str, Any], on_event: Callable[[int], None] | None = None
) -> list[bytes]:
    """A streamed request's events, read as they come; `on_event(n)` after the n-th."""
    host = url.removeprefix("http://")
    conn = http.client.HTTPConnection(host, timeout=60)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            json.dumps({**body, "stream": True}),
            {"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        events: list[bytes] = []
        buffer = b""
        while True:
            chunk = resp.read1(65536)
            if not chunk:
                return events
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if event.startswith(b"data:"):
                    events.append(event)
                    if on_event is not None:
                        on_event(len(events))
    finally:
        conn.close()


# --- engine = "openai" ------------------------------------------------------------------------


@pytest.mark.parametrize("count", ["llama.cpp", "none"])
def test_llama_server_as_an_openai_command_serves_and_is_selected_by_context(
    start_gateway, tiny_models, llama_server, count: str
) -> None:
    gw = start_gateway([openai_model(llama_server, tiny_models, count)])
    small = gw.post("/v1/chat/completions", chat("tiny-o-chat"))
    assert small.status == 200, small.body
    assert small.json()["model"] == "tiny-o-chat"  # the alias the client used
    assert small.headers["X-Gateway-Context"] == "512"
    engine = gw.engine("tiny-o")
    assert engine["engine"] == "openai" and engine["state"] == "ready"
    assert alive(engine["pid"])

    events = stream_events(gw.url, chat("tiny-o"))
    assert events[-1] == b"data: [DONE]" and len(events) > 2
    assert json.loads(events[0][5:])["model"] == "tiny-o"

    large = gw.post("/v1/chat/completions", chat("tiny-o", PROMPT_800))
    assert large.status == 200, large.body
    assert large.headers["X-Gateway-Context"] == "2048"  # too large for 512: upgraded
    assert gw.engine("tiny-o")["variant"]["context"] == 2048
    counted = metric(gw, "llm_gateway_tokens_counted_total", model="tiny-o")
    if count == "none":
        assert counted == 0  # never counted: the estimate, then the engine's refusal, decided
    else:
        assert counted > 0


def test_an_openai_engine_that_crashes_is_started_again(start_gateway, tiny_models, llama_server) -> None:
    gw = start_gateway([openai_model(llama_server, tiny_models, "llama.cpp")])
    assert gw.post("/v1/chat/completions", chat("tiny-o")).status == 200
    pid = gw.engine("tiny-o")["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: gw.engine("tiny-o")["state"] == "crashed")
    again = gw.post("/v1/chat/completions", chat("tiny-o"))
    assert again.status == 200, again.body
    assert gw.engine("tiny-o")["pid"] not in (pid, None)


def test_an_openai_command_that_cannot_start_gets_a_clear_error(
    start_gateway, tiny_models, llama_server
) -> None:
    model = openai_model(llama_server, tiny_models, "none")
    model["command"] = ["/nonexistent/vllm", "serve", "--port", "${PORT}"]
    gw = start_gateway([model])
    reply = gw.post("/v1/chat/completions", chat("tiny-o"))
    assert reply.status == 503, reply.body
    assert "/nonexistent/vllm" in reply.json()["error"]["message"]


def test_llama_cpp_endpoints_get_501_naming_the_engine_type(start_gateway, tiny_models, llama_server) -> None:
    gw = start_gateway([openai_model(llama_server, tiny_models, "none")])
    reply = gw.post("/v1/rerank", {"model": "tiny-o", "query": "q", "documents": ["a"]})
    assert reply.status == 501, reply.body
    error = reply.json()["error"]
    assert error["code"] == "not_implemented" and "'openai'" in error["message"]
    assert gw.engine("tiny-o")["state"] == "idle"  # nothing was started for it


# --- engine = "remote" --------------------------------------------------------------------


@pytest.fixture
def upstream(start_gateway, tiny_models) -> Iterator[Gateway]:
    """A second gateway, serving the demo models; restartable on the same port."""
    gw = start_gateway(tiny_model_config(tiny_models))
    yield gw
    if gw.process.poll() is None:
        stop_process(gw.process)


def remote_model(upstream: Gateway, **extra: Any) -> dict[str, Any]:
    return {
        "name": "far",
        "aliases": ["far-chat"],
        "engine": "remote",
        "url": upstream.url,
        "served_name": "tiny",
        "health_interval": 0.2,
        "default_max_tokens": 32,
        "variants": [{"context": 512}, {"context": 2048}, {"context": 8192}],
        **extra,
    }


def restart(gw: Gateway) -> None:
    gw.process = spawn_gateway(gw.config_path, gw.log_path.with_suffix(".again.log"))
    wait_healthy(gw.url, gw.process)


def test_a_second_gateway_serves_as_the_remote_of_the_first(start_gateway, upstream: Gateway) -> None:
    front = start_gateway([remote_model(upstream)])
    reply = front.post("/v1/chat/completions", chat("far-chat"))
    assert reply.status == 200, reply.body
    assert reply.json()["model"] == "far-chat"  # renamed back from the upstream's "tiny"
    assert upstream.engine("tiny")["state"] == "ready"  # it arrived as "tiny"
    events = stream_events(front.url, chat("far"))
    assert events[-1] == b"data: [DONE]"
    assert all(json.loads(e[5:])["model"] == "far" for e in events[:-1])
    engine = front.engine("far")
    assert (engine["engine"], engine["state"], engine["upstream"], engine["pid"]) == (
        "remote",
        "ready",
        upstream.url,
        None,
    )
    too_large = front.post("/v1/chat/completions", chat("far", max_tokens=9000))
    assert too_large.status == 400 and too_large.json()["error"]["code"] == "context_length_exceeded"


def test_a_remote_that_dies_mid_stream_is_crashed_and_comes_back(start_gateway, upstream: Gateway) -> None:
    front = start_gateway([remote_model(upstream)])
    assert front.post("/v1/chat/completions", chat("far")).status == 200
    front_pid = front.process.pid

    def kill_upstream(n: int) -> None:
        if n == 3:
            upstream.process.send_signal(signal.SIGKILL)

    long = chat("far", max_tokens=2000, ignore_eos=True)
    events = stream_events(front.url, long, kill_upstream)
    assert events[-1] != b"data: [DONE]"
    assert b'"error"' in events[-1], events[-3:]  # the client hears of it
    upstream.process.wait(10)
    assert front.request("GET", "/health").status == 200
    wait_until(lambda: front.engine("far")["state"] == "crashed", timeout=10)
    began = time.monotonic()
    refused = front.post("/v1/chat/completions", chat("far"))
    assert refused.status == 503, refused.body
    assert time.monotonic() - began < 1  # at once, not after a wait
    assert "unreachable" in refused.json()["error"]["message"] and "Retry-After" in refused.headers

    restart(upstream)
    wait_until(lambda: front.engine("far")["state"] == "ready", timeout=20)
    again = front.post("/v1/chat/completions", chat("far"))
    assert again.status == 200, again.body
    assert front.process.pid == front_pid and front.process.poll() is None
    assert metric(front, "llm_gateway_unreachable_total", model="far") >= 1


def test_a_remote_needs_its_key_and_passes_the_upstreams_401_through(
    start_gateway, tiny_models, monkeypatch
) -> None:
    upstream = start_gateway(tiny_model_config(tiny_models), api_keys=["sk-upstream"])
    monkeypatch.setenv("FAR_KEY", "sk-upstream")
    keyed = start_gateway([remote_model(upstream, api_key_env="FAR_KEY")])
    assert keyed.post("/v1/chat/completions", chat("far")).status == 200
    monkeypatch.delenv("FAR_KEY")
    unkeyed = start_gateway([remote_model(upstream, api_key_env="FAR_KEY", health="/health")])
    assert "FAR_KEY is not set" in unkeyed.log()
    reply = unkeyed.post("/v1/chat/completions", chat("far"))
    assert reply.status == 401, reply.body
    assert reply.json()["error"]["code"] == "invalid_api_key"


def test_a_remote_takes_no_engine_place(start_gateway, tiny_models, upstream: Gateway) -> None:
    """With max_engines = 1, the remote and a local engine serve side by side."""
    local = tiny_model_config(tiny_models)[1]  # tiny-b
    gw = start_gateway([remote_model(upstream), local], max_engines=1)
    assert gw.post("/v1/chat/completions", chat("far")).status == 200
    assert gw.post("/v1/chat/completions", chat("tiny-b")).status == 200
    assert gw.post("/v1/chat/completions", chat("far")).status == 200
    states = {e["model"]: e["state"] for e in gw.state()["engines"]}
    assert states == {"far": "ready", "tiny-b": "ready"}
    assert metric(gw, "llm_gateway_swaps_total") == 0


def test_requests_in_flight_to_a_frozen_upstream_end_when_it_is_found_unreachable(
    start_gateway, upstream: Gateway
) -> None:
    """SIGSTOP the upstream: once its probe fails, a stream gets its error event and a
    plain request its error, instead of waiting for the client's own timeout."""
    front = start_gateway([remote_model(upstream, health_check_timeout=1)])
    assert front.post("/v1/chat/completions", chat("far")).status == 200
    plain: list[Any] = []
    waiting = threading.Thread(
        target=lambda: plain.append(
            front.post("/v1/chat/completions", chat("far", max_tokens=3000, ignore_eos=True), timeout=30)
        )
    )

    def freeze(n: int) -> None:
        if n == 3:
            waiting.start()
            time.sleep(0.2)  # the plain request is sent before the freeze
            upstream.process.send_signal(signal.SIGSTOP)

    try:
        began = time.monotonic()
        events = stream_events(front.url, chat("far", max_tokens=3000, ignore_eos=True), freeze)
        ended = time.monotonic() - began
        waiting.join(30)
    finally:
        upstream.process.send_signal(signal.SIGCONT)
    assert b'"error"' in events[-1] and b"unreachable" in events[-1], events[-2:]
    assert ended < 10
    assert plain and plain[0].status == 502, plain
    assert front.engine("far")["state"] == "crashed"


def test_a_request_an_upstream_took_is_never_sent_twice(start_gateway) -> None:
    """An upstream that drops the connection after reading the request may have run it
    (and billed it): the client gets 502, the upstream saw it once."""
    port = free_port()
    fake = subprocess.Popen(
        [sys.executable, str(FAKE), "drop", "--port", str(port)], stdout=subprocess.DEVNULL
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", fake)
        gw = start_gateway(
            [
                {
                    "name": "far",
                    "engine": "remote",
                    "url": f"http://127.0.0.1:{port}",
                    "variants": [{"context": 2048}],
                }
            ]
        )
        reply = gw.post("/v1/chat/completions", chat("far"))
        assert reply.status == 502 and "not sent again" in reply.json()["error"]["message"], reply.body
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/completions", timeout=5) as seen:
            assert json.loads(seen.read())["completions"] == 1
    finally:
        stop_process(fake)


def test_an_openai_engine_that_serves_one_connection_at_a_time_is_not_held_up(start_gateway) -> None:
    """No connection is held open ahead of the next request for an engine of unknown
    kind: a server that takes one connection at a time would wait on it for good."""
    gw = start_gateway(
        [
            {
                "name": "one",
                "engine": "openai",
                "command": [sys.executable, str(FAKE), "serial", "--port", "${PORT}"],
                "health_check_timeout": 2,
                "variants": [{"context": 2048}],
            }
        ]
    )
    for _ in range(3):
        reply = gw.post("/v1/chat/completions", chat("one"), timeout=20)
        assert reply.status == 200, reply.body
    assert gw.state()["counters"].get("frozen", 0) == 0
