"""Operations against the real engine: metrics, logs, control endpoints, API keys, reload."""

from __future__ import annotations

import os
import resource
import select
import signal
import socket
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import Gateway, alive, lua_config, metric, tiny_model_config, wait_until

CHAT = [{"role": "user", "content": "hi"}]


def ask(gateway: Gateway, model: str = "tiny", max_tokens: int = 4, **kw):
    return gateway.post(
        "/v1/chat/completions", {"model": model, "messages": CHAT, "max_tokens": max_tokens}, **kw
    )


@pytest.fixture
def gateway(start_gateway, tiny_models) -> Gateway:
    return start_gateway(tiny_model_config(tiny_models))


def test_metrics_after_a_swap_a_crash_and_a_rejection(gateway: Gateway) -> None:
    assert ask(gateway).status == 200
    assert ask(gateway, "tiny-b").status == 200  # one swap
    os.kill(gateway.engine()["pid"], signal.SIGKILL)  # one crash
    wait_until(lambda: gateway.engine()["state"] == "crashed")
    assert ask(gateway, "tiny-b").status == 200
    rejected = gateway.post(
        "/v1/chat/completions", {"model": "tiny-b", "messages": [{"role": "user", "content": "x" * 3000}]}
    )
    assert rejected.status == 400  # one rejection: larger than tiny-b's only variant
    assert ask(gateway, "nope").status == 404

    m = "llm_gateway"
    assert metric(gateway, f"{m}_requests_total", model="tiny", status="200") == 1
    assert metric(gateway, f"{m}_requests_total", model="tiny-b", status="200") == 2
    assert metric(gateway, f"{m}_requests_total", model="tiny-b", status="400") == 1
    assert metric(gateway, f"{m}_requests_total", model="", status="404") == 1
    assert metric(gateway, f"{m}_swaps_total") == 1
    assert metric(gateway, f"{m}_crashes_total", model="tiny-b") == 1
    assert metric(gateway, f"{m}_starts_total") == 3
    assert metric(gateway, f"{m}_selections_total", outcome="rejected") == 1
    assert metric(gateway, f"{m}_engine_startup_seconds_count") == 3
    assert metric(gateway, f"{m}_request_duration_seconds_count", model="tiny-b") == 3
    assert metric(gateway, f"{m}_time_to_first_byte_seconds_count", model="tiny") == 1
    assert metric(gateway, f"{m}_engine_state", state="ready") == 1
    assert metric(gateway, f"{m}_engine_state", state="idle") == 0
    assert metric(gateway, f"{m}_queue_depth") == 0
    assert metric(gateway, f"{m}_tokens_counted_total", model="tiny-b") > 0


def test_logs_and_the_live_log_stream(gateway: Gateway) -> None:
    # Subscribed once the answer's headers are in: every line logged from then on is live.
    stream = urllib.request.urlopen(gateway.url + "/gateway/logs/stream?lines=1", timeout=20)
    events: list[str] = []
    seen_swap = threading.Event()

    def follow() -> None:
        for raw in stream:
            events.append(raw.decode())
            if "engine ready tiny-b@2048" in events[-1]:
                seen_swap.set()
                return

    with stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        assert "engine ready" not in gateway.log()  # so the lines below are logged after subscribing
        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        ask(gateway)
        ask(gateway, "tiny-b")
        assert seen_swap.wait(10), events
    ready = [line for line in events if "engine ready" in line]
    assert [line.startswith("data: ") for line in ready] == [True, True], events
    assert "engine ready tiny@512" in ready[0] and "engine ready tiny-b@2048" in ready[1]
    recent = gateway.request("GET", "/gateway/logs?lines=500").body.decode()
    assert "select" in recent and "[tiny@512 pid=" in recent  # engine output, prefixed


def test_load_unload_and_models(gateway: Gateway) -> None:
    loaded = gateway.post("/gateway/load", {"model": "tiny-chat", "context": 2048})
    assert loaded.status == 200
    assert loaded.json()["context"] == 2048 and alive(loaded.json()["pid"])
    assert gateway.engine()["state"] == "ready"
    models = {m["name"]: m for m in gateway.request("GET", "/gateway/models").json()["models"]}
    assert [v["running"] for v in models["tiny"]["variants"]] == [False, True, False]
    assert models["tiny"]["tokens_per_byte"] is None
    assert gateway.post("/gateway/load", {"model": "tiny", "context": 999}).status == 400
    assert gateway.post("/gateway/load", {"model": "ghost"}).status == 404
    pid = loaded.json()["pid"]
    unloaded = gateway.post("/gateway/unload", {})
    assert unloaded.status == 200 and unloaded.json()["engines"] == []
    assert not alive(pid)
    assert [h["trigger"] for h in gateway.state()["history"]][-3:] == ["drain", "drained", "stopped"]


def test_preload_starts_a_model_at_start_up(start_gateway, tiny_models) -> None:
    gateway = start_gateway(tiny_model_config(tiny_models), preload={"model": "tiny", "context": 8192})
    wait_until(lambda: gateway.engine()["state"] == "ready")
    assert gateway.engine()["variant"]["context"] == 8192
    assert ask(gateway).headers["X-Gateway-Context"] == "8192"  # reused, no swap


def test_api_keys_and_admin_key(start_gateway, tiny_models, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# one key a line\nk-one\nk-two\n")
    gateway = start_gateway(tiny_model_config(tiny_models), api_keys=str(keys), admin_key="adm")
    assert gateway.request("GET", "/health").status == 200  # always open
    missing = ask(gateway)
    assert missing.status == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert ask(gateway, headers={"Authorization": "Bearer wrong"}).status == 401
    assert ask(gateway, headers={"Authorization": "Bearer k-two"}).status == 200
    assert ask(gateway, headers={"x-api-key": "k-one"}).status == 200
    assert gateway.request("GET", "/v1/models", headers={"Authorization": "Bearer k-one"}).status == 200
    assert gateway.request("GET", "/metrics").status == 401
    # /gateway/* takes the admin key only
    assert gateway.request("GET", "/gateway/state", headers={"Authorization": "Bearer k-one"}).status == 401
    state = gateway.request("GET", "/gateway/state", headers={"Authorization": "Bearer adm"})
    assert state.status == 200 and [e["state"] for e in state.json()["engines"]] == ["ready"]


def write_config(gateway: Gateway, models: list[dict], **server) -> None:
    port = int(gateway.url.rsplit(":", 1)[1])
    gateway.config_path.write_text(lua_config(port, models, **server))


def test_bad_reload_keeps_the_old_config(gateway: Gateway, tiny_models) -> None:
    ask(gateway)
    gateway.config_path.write_text("server = { listen_v4 = 'nonsense' }\nmodels = {}\n")
    resp = gateway.post("/gateway/reload", {})
    assert resp.status == 400
    assert "server.listen_v4" in resp.json()["error"]["message"]
    assert ask(gateway).status == 200
    assert gateway.state()["counters"]["starts"] == 1
    assert "config reload rejected" in gateway.request("GET", "/gateway/logs").body.decode()


def test_good_reload_swaps_only_the_changed_engine(gateway: Gateway, tiny_models) -> None:
    ask(gateway)
    pid = gateway.engine()["pid"]
    models = tiny_model_config(tiny_models)
    models[1]["args"] = [*models[1]["args"], "--seed", "7"]  # only tiny-b changes
    models.append({"name": "tiny-c", "args": models[1]["args"], "variants": [{"context": 1024}]})
    write_config(gateway, models)
    assert gateway.post("/gateway/reload", {}).status == 200
    assert gateway.engine()["pid"] == pid and gateway.engine()["state"] == "ready"  # tiny kept
    assert "tiny-c" in {m["id"] for m in gateway.request("GET", "/v1/models").json()["data"]}

    models[0]["args"] = [*models[0]["args"], "--seed", "3"]  # now tiny's own args change
    write_config(gateway, models)
    gateway.process.send_signal(signal.SIGHUP)
    wait_until(lambda: gateway.engine()["state"] == "idle")
    assert not alive(pid)
    reason = [h["reason"] for h in gateway.state()["history"] if h["trigger"] == "drain"][-1]
    assert reason == "config reload changed tiny@512"
    assert ask(gateway).status == 200
    assert gateway.engine()["pid"] != pid


def test_reload_never_drops_an_in_flight_request(gateway: Gateway, tiny_models) -> None:
    result: list = []
    long = threading.Thread(target=lambda: result.append(ask(gateway, max_tokens=3000)))
    gateway.post("/gateway/load", {"model": "tiny", "context": 8192})
    long.start()
    wait_until(lambda: gateway.state()["in_flight"] == 1, interval=0.002)
    models = tiny_model_config(tiny_models)
    models[0]["args"] = [*models[0]["args"], "--seed", "3"]
    write_config(gateway, models)
    assert gateway.post("/gateway/reload", {}).status == 200
    long.join(30)
    assert result[0].status == 200
    assert result[0].json()["usage"]["completion_tokens"] == 3000


def open_files_limit(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError("no open files limit")


def test_the_gateway_takes_the_hard_limit_of_open_files(start_gateway, tiny_models) -> None:
    # A stream holds two sockets: at the usual soft limit of 1024 about 500 would fit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"the hard limit here is {hard}: there is nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        gateway = start_gateway(tiny_model_config(tiny_models))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    gateway_soft, gateway_hard = open_files_limit(gateway.process.pid)
    assert gateway_soft != "1024"
    assert gateway_soft == gateway_hard or hard == resource.RLIM_INFINITY


def test_a_burst_of_connections_is_taken_while_the_gateway_is_busy(start_gateway, tiny_models) -> None:
    gateway = start_gateway(tiny_model_config(tiny_models))
    port = int(gateway.url.rsplit(":", 1)[1])
    clients = []
    os.kill(gateway.process.pid, signal.SIGSTOP)  # a loop that accepts nothing for a while
    try:
        for _ in range(600):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            clients.append(sock)
        # The kernel completes what the listen backlog holds; beyond it, SYNs are dropped
        # and retried a second later (aiohttp's default backlog is 128).
        _, connected, _ = select.select([], clients, [], 0.5)
        assert len(connected) == len(clients)
    finally:
        os.kill(gateway.process.pid, signal.SIGCONT)
        for sock in clients:
            sock.close()
    assert gateway.request("GET", "/health").status == 200
