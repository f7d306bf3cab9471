"""Several gateways behind a real HAProxy, its config written by `llm-gateway front`:
three gateways on 127.0.0.2-4 with real engines (the model `shared` on two of them),
HAProxy on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.demo.harness import free_port, lua_config, spawn_gateway, wait_healthy
from tests.conftest import Gateway, launch_haproxy, metric, wait_until

CHAT = [{"role": "user", "content": "hi"}]
REQUESTS = "llm_gateway_requests_total"
# Which gateway serves what: a model on one gateway, `shared` on two, an alias.
LAYOUT = {
    "127.0.0.2": [("alpha", "tiny", ["alpha-chat"]), ("shared", "tiny-b", [])],
    "127.0.0.3": [("shared", "tiny-b", []), ("beta", "tiny", [])],
    "127.0.0.4": [("gamma", "tiny-b", [])],
}
CANONICAL = {"alpha": "alpha", "alpha-chat": "alpha", "shared": "shared", "beta": "beta", "gamma": "gamma"}
# The issue asks for the median of 20; on 2 shared cores a median of 20 moves by half a
# millisecond from run to run, so each path is measured 40 times.
TTFT_SAMPLES = 40


def model(name: str, path: Path, aliases: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "aliases": aliases,
        "args": ["-m", str(path), "-t", "1"],
        "default_max_tokens": 16,
        "request": {"defaults": {"temperature": 0}},
        "variants": [{"context": 2048}],
    }


def launch_gateway(folder: Path, host: str, models: list[dict[str, Any]], **server: Any) -> Gateway:
    """A gateway listening on `host` (a loopback address of its own)."""
    port = free_port()
    config = folder / f"gateway-{host}.cfg.lua"
    config.write_text(lua_config(port, models, listen_v4=f"{host}:{port}", max_engines=2, **server))
    log_path = folder / f"gateway-{host}.log"
    gateway = Gateway(f"http://{host}:{port}", spawn_gateway(config, log_path), config, log_path)
    try:
        wait_healthy(gateway.url, gateway.process)
    except RuntimeError as exc:
        raise AssertionError(f"{exc}:\n{gateway.log()}") from None
    return gateway


def write_front(*urls: str, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """`llm-gateway front` as a user runs it."""
    argv = [arg for url in urls for arg in ("--gateway", url)]
    command = [sys.executable, "-m", "gateway", "front", *argv, *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@dataclass
class Cluster:
    layout: dict[str, Any]  # like LAYOUT
    gateways: dict[str, Gateway]  # by host
    front: Gateway

    def serving(self, name: str) -> list[Gateway]:
        return [
            self.gateways[host]
            for host, served in self.layout.items()
            if any(name in (model, *aliases) for model, _, aliases in served)
        ]


def start_cluster(
    folder: Path, haproxy: str, models: dict[str, Path], layout: dict[str, Any], **server: Any
) -> Cluster:
    gateways = {
        host: launch_gateway(folder, host, [model(n, models[f], a) for n, f, a in served], **server)
        for host, served in layout.items()
    }
    port = free_port()
    written = write_front(*(g.url for g in gateways.values()), options=("--listen", f"127.0.0.1:{port}"))
    assert written.returncode == 0, written.stderr
    config = folder / "haproxy.cfg"
    config.write_text(written.stdout)
    return Cluster(layout, gateways, launch_haproxy(haproxy, config, f"http://127.0.0.1:{port}"))


def stop_cluster(cluster: Cluster) -> None:
    cluster.front.stop(timeout=10)
    codes = {host: gw.stop() for host, gw in cluster.gateways.items() if gw.process.poll() is None}
    assert set(codes.values()) <= {0}, codes


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, haproxy_binary, tiny_models, llama_server) -> Iterator[Cluster]:
    running = start_cluster(tmp_path_factory.mktemp("front"), haproxy_binary, tiny_models, LAYOUT)
    yield running
    stop_cluster(running)


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def stream(
    conn: http.client.HTTPConnection, name: str, max_tokens: int
) -> tuple[Any, list[float], list[bytes]]:
    """A streamed chat on a kept-alive connection: the response, each data event's arrival
    (seconds after sending) and its text."""
    body = json.dumps({"model": name, "messages": CHAT, "max_tokens": max_tokens, "stream": True})
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    arrivals, events = [], []
    for line in response:
        if line.startswith(b"data: "):
            arrivals.append(time.perf_counter() - started)
            events.append(line[6:].strip())
    return response, arrivals, events


def requests_served(gateways: list[Gateway], name: str) -> list[float]:
    return [metric(g, REQUESTS, model=CANONICAL[name]) for g in gateways]


@pytest.mark.parametrize("name", list(CANONICAL))
def test_chat_and_stream_for_each_model_reach_a_gateway_serving_it(cluster: Cluster, name: str) -> None:
    serving = cluster.serving(name)
    others = [g for g in cluster.gateways.values() if g not in serving]
    before = requests_served(serving, name)
    answer = cluster.front.post("/v1/chat/completions", {"model": name, "messages": CHAT, "max_tokens": 4})
    assert answer.status == 200, answer.body
    # HAProxy writes header names in lower case (HTTP's are case-insensitive).
    assert answer.headers["x-gateway-model"] == CANONICAL[name] and answer.json()["model"] == name
    conn = http.client.HTTPConnection(*_host_port(cluster.front.url), timeout=30)
    response, _, events = stream(conn, name, 4)
    conn.close()
    assert response.status == 200 and response.headers["X-Gateway-Model"] == CANONICAL[name]
    assert events[-1] == b"[DONE]" and json.loads(events[0])["model"] == name
    after = requests_served(serving, name)
    assert sum(after) - sum(before) == 2
    assert all(metric(g, REQUESTS, model=CANONICAL[name]) == 0 for g in others)
    for gateway, counted in zip(serving, (a - b for a, b in zip(after, before, strict=True)), strict=True):
        if counted:  # the gateway that served it runs the model's engine
            assert gateway.engine(CANONICAL[name])["state"] == "ready"


def test_models_through_the_front_are_the_union(cluster: Cluster) -> None:
    listed = cluster.front.request("GET", "/v1/models")
    assert listed.status == 200
    assert [m["id"] for m in listed.json()["data"]] == ["alpha", "alpha-chat", "shared", "beta", "gamma"]


def test_a_stream_through_haproxy_arrives_event_for_event(cluster: Cluster) -> None:
    """The time to the first event through HAProxy is the gateway's own plus under a
    millisecond, and the events of a longer answer arrive as they are made, not together
    at its end. Each path in turn on a kept-alive connection: the pairs' differences
    cancel what the machine's load does to both."""
    paths = {
        "direct": http.client.HTTPConnection(*_host_port(cluster.gateways["127.0.0.4"].url), timeout=30),
        "front": http.client.HTTPConnection(*_host_port(cluster.front.url), timeout=30),
    }
    for conn in paths.values():
        stream(conn, "gamma", 4)  # warm: the connection, the engine
    firsts: dict[str, list[float]] = {"direct": [], "front": []}
    for i in range(TTFT_SAMPLES):
        for path in ("direct", "front") if i % 2 else ("front", "direct"):
            response, arrivals, _ = stream(paths[path], "gamma", 4)
            assert response.status == 200
            firsts[path].append(arrivals[0] * 1000)
    _, arrivals, events = stream(paths["front"], "gamma", 1000)
    for conn in paths.values():
        conn.close()
    direct, front = statistics.median(firsts["direct"]), statistics.median(firsts["front"])
    added = statistics.median(f - d for d, f in zip(firsts["direct"], firsts["front"], strict=True))
    print(f"TTFT median of {TTFT_SAMPLES}: direct {direct:.2f} ms, via HAProxy {front:.2f} ms ({added:+.2f})")
    assert added < 1.0
    # Held back and sent together, the events would all arrive at the end.
    early = sum(arrival < arrivals[-1] - 0.02 for arrival in arrivals)
    print(
        f"{len(events)} events in {(arrivals[-1] - arrivals[0]) * 1000:.0f} ms, {early} 20 ms before the last"
    )
    assert len(events) > 500 and early > len(events) / 2


def test_a_gateway_down_when_the_command_runs_is_reported(cluster: Cluster) -> None:
    down = f"http://127.0.0.5:{free_port()}"
    up = cluster.gateways["127.0.0.4"].url
    refused = write_front(up, down)
    assert refused.returncode == 1 and refused.stdout == ""
    assert f"{down}: GET /v1/models failed" in refused.stderr
    allowed = write_front(up, down, options=("--allow-missing",))
    assert allowed.returncode == 0 and "1 gateways left out" in allowed.stderr
    assert f"server {up.removeprefix('http://')} " in allowed.stdout


def test_sigterm_of_a_gateway_serving_the_shared_model_fails_no_request(
    tmp_path, haproxy_binary, tiny_models, llama_server
) -> None:
    layout = {host: [("shared", "tiny-b", [])] for host in ("127.0.0.2", "127.0.0.3")}
    pair = start_cluster(tmp_path, haproxy_binary, tiny_models, layout, shutdown_delay=2)
    leaving, staying = pair.gateways.values()
    failures: list[str] = []
    done = threading.Event()
    clients = [threading.Thread(target=_ask_until, args=(pair.front, done, failures, i)) for i in range(4)]
    try:
        for client in clients:
            client.start()
        wait_until(lambda: min(metric(g, REQUESTS, model="shared") for g in pair.gateways.values()) >= 2, 20)
        leaving.process.send_signal(signal.SIGTERM)
        assert leaving.process.wait(30) == 0
        served_after = metric(staying, REQUESTS, model="shared")
        wait_until(lambda: metric(staying, REQUESTS, model="shared") >= served_after + 8, timeout=20)
    finally:
        done.set()
        for client in clients:
            client.join(30)
        stop_cluster(pair)
    assert not failures, failures[:5]
    # HAProxy took it out on its 503 from /health, before it stopped listening.
    server = leaving.url.removeprefix("http://")
    assert f"Server gateways/{server} is DOWN, reason: Layer7 wrong status, code: 503" in pair.front.log()


def _ask_until(front: Gateway, done: threading.Event, failures: list[str], client: int) -> None:
    """Requests for `shared` one after another, plain and streamed in turn, until `done`."""
    conn = http.client.HTTPConnection(*_host_port(front.url), timeout=30)
    turn = 0
    while not done.is_set():
        turn += 1
        try:
            if turn % 2:
                response, _, events = stream(conn, "shared", 40)
                ok = response.status == 200 and events[-1:] == [b"[DONE]"]
            else:
                answer = front.post(
                    "/v1/chat/completions", {"model": "shared", "messages": CHAT, "max_tokens": 40}
                )
                ok = answer.status == 200 and answer.json()["usage"]["completion_tokens"] > 0
        except (OSError, http.client.HTTPException, ValueError) as exc:
            conn.close()
            ok, exc_text = False, repr(exc)
        else:
            exc_text = ""
        if not ok:
            failures.append(f"client {client} turn {turn}: {exc_text or 'bad answer'}")
    conn.close()
