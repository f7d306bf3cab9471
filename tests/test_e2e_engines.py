"""Several engines at once (issue 11) against the real engine: residency, least recently
used eviction (never a busy or keep_loaded engine), a variant upgrade beside another
model, measured memory, the memory budget, shutdown and unload of several engines."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config
from gateway.demo.harness import free_port, lua_config, spawn_gateway
from gateway.engine import footprint
from gateway.utils.sizes import human_bytes
from tests.conftest import Gateway, Response, alive, metric, tiny_model_config, wait_until

CHAT = [{"role": "user", "content": "hi"}]
MiB = 1 << 20


def ask(gateway: Gateway, model: str, max_tokens: int = 4) -> Response:
    return gateway.post("/v1/chat/completions", {"model": model, "messages": CHAT, "max_tokens": max_tokens})


def model(name: str, path: Path, contexts: tuple[int, ...] = (2048,), **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "args": ["-m", str(path), "-t", "1"],
        "default_max_tokens": 16,
        "request": {"defaults": {"temperature": 0}},
        "variants": [{"context": c} for c in contexts],
        **extra,
    }


def three_models(
    tiny_models: dict[str, Path], tiny_contexts: tuple[int, ...] = (512,), **extra: dict[str, Any]
) -> list[dict[str, Any]]:
    """tiny, tiny-b, and tiny-c (tiny-b's GGUF under another name); `extra` by model name
    with "_" for "-" (tiny_b={"keep_loaded": True})."""
    return [
        model("tiny", tiny_models["tiny"], tiny_contexts, **extra.get("tiny", {})),
        model("tiny-b", tiny_models["tiny-b"], **extra.get("tiny_b", {})),
        model("tiny-c", tiny_models["tiny-b"], **extra.get("tiny_c", {})),
    ]


def pid_of(gateway: Gateway, name: str) -> int:
    engine = gateway.engine(name)
    assert engine["state"] == "ready" and engine["pid"], engine
    return engine["pid"]


def open_stream(gateway: Gateway, name: str, max_tokens: int):
    """A streamed answer under way (its first event read): its engine is busy until the
    stream ends or is closed."""
    body = {"model": name, "messages": CHAT, "max_tokens": max_tokens, "stream": True}
    req = urllib.request.Request(
        gateway.url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    resp = urllib.request.urlopen(req, timeout=60)
    assert next_event(resp).startswith(b"data: {")
    return resp


def next_event(stream) -> bytes:
    """The next data line of a stream (blank lines and comments are skipped)."""
    while (line := stream.readline()) and not line.startswith(b"data: "):
        pass
    return line


def in_thread(fn, *args) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)))
    thread.start()
    return thread, result


def eviction_lines(gateway: Gateway) -> list[str]:
    return [line for line in gateway.log().splitlines() if re.search(r"\bevict \S+ \(", line)]


def gone(*pids: int) -> None:
    wait_until(lambda: not any(alive(pid) for pid in pids), timeout=5)


# 1. Resident engines ----------------------------------------------------------------------


def test_two_resident_models_alternate_without_a_start(start_gateway, tiny_models) -> None:
    gateway = start_gateway(tiny_model_config(tiny_models), max_engines=2)
    assert ask(gateway, "tiny").status == 200
    assert ask(gateway, "tiny-b").status == 200
    pids = {"tiny": pid_of(gateway, "tiny"), "tiny-b": pid_of(gateway, "tiny-b")}
    for i in range(20):
        name = ("tiny", "tiny-b")[i % 2]
        resp = ask(gateway, name)
        assert resp.status == 200, resp.body[:300]
        assert resp.headers["X-Gateway-Model"] == name

    assert metric(gateway, "llm_gateway_starts_total") == 2
    assert metric(gateway, "llm_gateway_starts_total", model="tiny") == 1
    assert metric(gateway, "llm_gateway_starts_total", model="tiny-b") == 1
    assert metric(gateway, "llm_gateway_evictions_total") == 0
    assert metric(gateway, "llm_gateway_swaps_total") == 0
    state = gateway.state()
    assert state["counters"]["starts"] == 2
    engines = {e["model"]: (e["state"], e["pid"]) for e in state["engines"]}
    assert engines == {"tiny": ("ready", pids["tiny"]), "tiny-b": ("ready", pids["tiny-b"])}
    assert all(alive(pid) for pid in pids.values())
    assert [h["trigger"] for h in state["history"]].count("drain") == 0
    for name in pids:
        assert metric(gateway, "llm_gateway_engine_state", model=name, state="ready") == 1


# 2. Least recently used eviction ------------------------------------------------------------


def test_lru_idle_engine_is_evicted_never_a_busy_one(start_gateway, tiny_models) -> None:
    # tiny-b runs 8192 tokens so that a stream on it lasts far longer than the test needs.
    models = three_models(tiny_models)
    models[1]["variants"] = [{"context": 8192}]
    gateway = start_gateway(models, max_engines=2)
    assert ask(gateway, "tiny").status == 200
    assert ask(gateway, "tiny-b").status == 200
    tiny, tiny_b = pid_of(gateway, "tiny"), pid_of(gateway, "tiny-b")
    freed = human_bytes(gateway.engine("tiny")["memory"]["reserved"])

    # tiny is the least recently used and idle: it goes, tiny-b stays.
    resp = ask(gateway, "tiny-c")
    assert resp.status == 200
    gone(tiny)
    assert gateway.engine("tiny")["state"] == "idle"
    assert pid_of(gateway, "tiny-b") == tiny_b and alive(tiny_b)
    tiny_c = pid_of(gateway, "tiny-c")
    assert metric(gateway, "llm_gateway_evictions_total", model="tiny", reason="idle") == 1
    assert metric(gateway, "llm_gateway_evictions_total") == 1
    lines = eviction_lines(gateway)
    assert len(lines) == 1, lines
    assert re.search(
        rf"evict tiny@512 \(idle, least recently used\) to start tiny-c@2048 for request \S+: "
        rf"frees {re.escape(freed)}$",
        lines[0],
    ), lines[0]

    # tiny-b busy (a stream), then tiny-c used: tiny-b is the least recently used, but
    # busy, so the idle tiny-c makes room for tiny.
    stream = open_stream(gateway, "tiny-b", max_tokens=8000)
    with stream:
        assert ask(gateway, "tiny-c").status == 200
        freed = human_bytes(gateway.engine("tiny-c")["memory"]["reserved"])
        started = time.monotonic()
        assert ask(gateway, "tiny").status == 200
        served_in = time.monotonic() - started
        gone(tiny_c)
        busy = gateway.engine("tiny-b")
        assert (busy["state"], busy["pid"], busy["in_flight"]) == ("ready", tiny_b, 1)
        assert next_event(stream).startswith(b"data: {")  # still streaming, not cut off
    assert served_in < 8  # not after the stream (8000 tokens) ended
    assert gateway.engine("tiny-c")["state"] == "idle"
    assert pid_of(gateway, "tiny") not in (tiny, tiny_c)
    assert metric(gateway, "llm_gateway_evictions_total", model="tiny-c", reason="idle") == 1
    assert metric(gateway, "llm_gateway_evictions_total", reason="busy") == 0
    assert metric(gateway, "llm_gateway_evictions_total") == 2
    lines = eviction_lines(gateway)
    assert len(lines) == 2, lines
    assert re.search(
        rf"evict tiny-c@2048 \(idle, least recently used\) to start tiny@512 for request \S+: "
        rf"frees {re.escape(freed)}$",
        lines[1],
    ), lines[1]
    drains = [h for h in gateway.state()["history"] if h["trigger"] == "drain"]
    assert [h["model"] for h in drains] == ["tiny", "tiny-c"]  # never tiny-b


def test_keep_loaded_engine_is_never_evicted(start_gateway, tiny_models) -> None:
    gateway = start_gateway(three_models(tiny_models, tiny={"keep_loaded": True}), max_engines=2)
    assert ask(gateway, "tiny").status == 200  # the least recently used, but keep_loaded
    assert ask(gateway, "tiny-b").status == 200
    tiny, tiny_b = pid_of(gateway, "tiny"), pid_of(gateway, "tiny-b")
    assert gateway.engine("tiny")["keep_loaded"] is True
    freed = human_bytes(gateway.engine("tiny-b")["memory"]["reserved"])

    assert ask(gateway, "tiny-c").status == 200
    gone(tiny_b)
    assert pid_of(gateway, "tiny") == tiny and alive(tiny)
    assert gateway.engine("tiny-b")["state"] == "idle"
    assert gateway.engine("tiny-c")["state"] == "ready"
    assert metric(gateway, "llm_gateway_evictions_total", model="tiny-b", reason="idle") == 1
    assert metric(gateway, "llm_gateway_evictions_total") == 1
    lines = eviction_lines(gateway)
    assert len(lines) == 1, lines
    assert re.search(
        rf"evict tiny-b@2048 \(idle, least recently used\) to start tiny-c@2048 for request \S+: "
        rf"frees {re.escape(freed)}$",
        lines[0],
    ), lines[0]


# 3. A variant upgrade beside another model ---------------------------------------------------


def test_variant_upgrade_replaces_only_its_model_and_the_other_keeps_serving(
    start_gateway, tiny_models
) -> None:
    models = three_models(tiny_models, tiny_contexts=(2048, 8192))[:2]
    gateway = start_gateway(models, max_engines=2)
    assert ask(gateway, "tiny").status == 200
    assert gateway.engine("tiny")["variant"]["context"] == 2048
    assert ask(gateway, "tiny-b").status == 200
    tiny, tiny_b = pid_of(gateway, "tiny"), pid_of(gateway, "tiny-b")

    # A stream keeps tiny@2048 busy, so the upgrade waits for it in `draining`.
    with open_stream(gateway, "tiny", max_tokens=1900) as stream:
        # 2100 prompt tokens (given as ids: counted as they are) need tiny@8192.
        big = {"model": "tiny", "prompt": [65] * 2100, "max_tokens": 4}
        upgrade, upgraded = in_thread(gateway.post, "/v1/completions", big)
        wait_until(lambda: gateway.engine("tiny")["state"] == "draining", interval=0.005)
        other = ask(gateway, "tiny-b")
        draining = gateway.engine("tiny")
        assert other.status == 200 and other.headers["X-Gateway-Model"] == "tiny-b"
        assert (draining["state"], draining["pid"]) == ("draining", tiny)  # still upgrading
        assert not upgraded and upgrade.is_alive()
        assert next_event(stream).startswith(b"data: {")
    upgrade.join(30)
    assert upgraded[0].status == 200, upgraded[0].body[:300]
    assert upgraded[0].headers["X-Gateway-Context"] == "8192"
    gone(tiny)
    engine = gateway.engine("tiny")
    assert engine["variant"]["context"] == 8192 and engine["pid"] != tiny
    assert pid_of(gateway, "tiny-b") == tiny_b and alive(tiny_b)
    history = gateway.state()["history"]
    assert [h["trigger"] for h in history if h["model"] == "tiny-b"] == ["start", "healthy"]
    drain = [h for h in history if h["trigger"] == "drain"]
    assert [h["model"] for h in drain] == ["tiny"]
    assert drain[0]["reason"].startswith("swap to tiny@8192")
    assert metric(gateway, "llm_gateway_evictions_total") == 0  # its own engine: no eviction
    assert metric(gateway, "llm_gateway_starts_total", model="tiny-b") == 1
    assert ask(gateway, "tiny-b").status == 200


# 4. Memory: estimated and measured -----------------------------------------------------------


def test_measured_memory_and_the_estimate(start_gateway, tiny_models) -> None:
    gateway = start_gateway(tiny_model_config(tiny_models), max_engines=2)
    assert gateway.post("/gateway/load", {"model": "tiny", "context": 2048}).status == 200
    assert ask(gateway, "tiny-b").status == 200
    config = load_config(gateway.config_path)
    expected = {
        (m.name, v.context): footprint.estimate(v).total  # type: ignore[union-attr]
        for m in config.models
        for v in m.variants
    }

    state = gateway.state()
    engines = {e["model"]: e for e in state["engines"]}
    for name, context in (("tiny", 2048), ("tiny-b", 2048)):
        memory = engines[name]["memory"]
        assert memory["measured"] > 0, engines[name]
        assert memory["estimate"] == expected[(name, context)]
        assert memory["reserved"] == max(memory["estimate"], memory["measured"])
        assert (
            metric(gateway, "llm_gateway_engine_memory_bytes", model=name, kind="measured")
            == (memory["measured"])
        )
        assert (
            metric(gateway, "llm_gateway_engine_memory_bytes", model=name, kind="estimate")
            == (memory["estimate"])
        )
    # The demo models: 0.4 MiB of weights, a KV cache of 128 bytes a token, 32 MiB overhead.
    assert engines["tiny"]["memory"]["estimate"] == (
        tiny_models["tiny"].stat().st_size + 2048 * 256 + footprint.ENGINE_OVERHEAD
    )
    assert state["memory"]["reserved"] == sum(e["memory"]["reserved"] for e in engines.values())

    listed = {m["name"]: m for m in gateway.request("GET", "/gateway/models").json()["models"]}
    for name, m in listed.items():
        for v in m["variants"]:
            assert v["memory"]["estimate"] == expected[(name, v["context"])], (name, v)
            if v["running"]:
                assert v["memory"] == engines[name]["memory"], (name, v)
            else:
                assert v["memory"]["measured"] is None, (name, v)
    assert [v["running"] for v in listed["tiny"]["variants"]] == [False, True, False]
    assert listed["tiny-b"]["variants"][0]["memory"]["measured"] > 0


# 5. The memory budget -------------------------------------------------------------------------


def budget_models(tiny_models: dict[str, Path], c_memory: str = "100MiB") -> list[dict[str, Any]]:
    return three_models(
        tiny_models,
        tiny={"memory": "100MiB"},
        tiny_b={"memory": "100MiB"},
        tiny_c={"memory": c_memory},
    )


def test_the_memory_budget_evicts_the_lru_engine(start_gateway, tiny_models) -> None:
    # max_engines would let all three run: only the budget (two of 100 MiB) limits.
    gateway = start_gateway(budget_models(tiny_models), max_engines=3, memory_budget="250MiB")
    assert ask(gateway, "tiny").status == 200
    assert ask(gateway, "tiny-b").status == 200
    tiny, tiny_b = pid_of(gateway, "tiny"), pid_of(gateway, "tiny-b")
    assert gateway.state()["memory"] == {
        "budget": 250 * MiB,
        "reserved": 200 * MiB,
        "free": 50 * MiB,
        "max_engines": 3,
    }

    assert ask(gateway, "tiny-c").status == 200
    gone(tiny)
    assert pid_of(gateway, "tiny-b") == tiny_b and alive(tiny_b)
    assert gateway.engine("tiny-c")["state"] == "ready"
    assert gateway.engine("tiny")["state"] == "idle"
    assert gateway.state()["memory"]["reserved"] == 200 * MiB
    assert metric(gateway, "llm_gateway_evictions_total", model="tiny", reason="idle") == 1
    assert metric(gateway, "llm_gateway_evictions_total") == 1
    lines = eviction_lines(gateway)
    assert len(lines) == 1, lines
    assert re.search(
        r"evict tiny@512 \(idle, least recently used\) to start tiny-c@2048 for request \S+: "
        r"frees 100\.0 MiB$",
        lines[0],
    ), lines[0]


def test_a_model_larger_than_the_budget_is_refused_at_load(tiny_models, tmp_path: Path) -> None:
    config = tmp_path / "over.cfg.lua"
    port = free_port()
    config.write_text(
        lua_config(port, budget_models(tiny_models, c_memory="300MiB"), max_engines=3, memory_budget="250MiB")
    )
    expected = (
        "models[3].variants[1] (tiny-c@2048): needs 300.0 MiB (declared), "
        "more than server.memory_budget 250.0 MiB (config)"
    )
    checked = subprocess.run(
        [sys.executable, "-m", "gateway", "--check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 2, checked
    assert checked.stderr == f"config error: {config}: {expected}\n"

    log = tmp_path / "over.log"
    process = spawn_gateway(config, log)
    try:
        assert process.wait(30) == 2  # it never serves
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert expected in log.read_text()


def test_a_model_that_never_fits_beside_a_keep_loaded_one_gets_503_at_once(
    start_gateway, tiny_models
) -> None:
    # tiny's small variant fits beside tiny-b (the config is accepted); its large one does not.
    models = three_models(tiny_models, (512, 2048), tiny={"keep_loaded": True}, tiny_b={"memory": "100MiB"})[
        :2
    ]
    models[0]["variants"] = [{"context": 512, "memory": "100MiB"}, {"context": 2048, "memory": "200MiB"}]
    gateway = start_gateway(models, max_engines=2, memory_budget="250MiB")
    assert gateway.post("/gateway/load", {"model": "tiny", "context": 2048}).status == 200
    tiny = pid_of(gateway, "tiny")

    started = time.monotonic()
    refused = ask(gateway, "tiny-b")
    took = time.monotonic() - started
    assert refused.status == 503, refused.body[:500]
    message = refused.json()["error"]["message"]
    assert "tiny-b@2048 needs 100.0 MiB" in message and "memory budget of 250.0 MiB" in message, message
    assert "keep_loaded" in message and "tiny 200.0 MiB" in message, message
    assert took < 2  # at once: nothing was started or stopped for it
    assert metric(gateway, "llm_gateway_starts_total", model="tiny-b") == 0
    assert metric(gateway, "llm_gateway_rejected_no_room_total", model="tiny-b") == 1
    assert gateway.engine("tiny-b")["state"] == "idle"
    assert pid_of(gateway, "tiny") == tiny and alive(tiny)
    assert "drain" not in [h["trigger"] for h in gateway.state()["history"]]


# 6. No engine outlives the gateway ------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_three_engines_end_with_the_gateway(start_gateway, tiny_models, sig: int) -> None:
    gateway = start_gateway(three_models(tiny_models), max_engines=3)
    for name in ("tiny", "tiny-b", "tiny-c"):
        assert ask(gateway, name).status == 200
    pids = [pid_of(gateway, name) for name in ("tiny", "tiny-b", "tiny-c")]
    assert len(set(pids)) == 3 and all(alive(pid) for pid in pids)
    code = gateway.stop(sig)
    assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    gone(*pids)
    if sig == signal.SIGTERM:
        stopped = [line for line in gateway.log().splitlines() if "engine stopped" in line]
        assert len(stopped) == 3, stopped


# 7. Unload one model, or all ------------------------------------------------------------------


def test_unload_one_model_then_all(start_gateway, tiny_models) -> None:
    gateway = start_gateway(three_models(tiny_models), max_engines=3)
    for name in ("tiny", "tiny-b", "tiny-c"):
        assert ask(gateway, name).status == 200
    pids = {name: pid_of(gateway, name) for name in ("tiny", "tiny-b", "tiny-c")}

    one = gateway.post("/gateway/unload", {"model": "tiny-b"})
    assert one.status == 200 and one.json()["unloaded"] == "tiny-b"
    assert not alive(pids["tiny-b"])
    left = {e["model"]: (e["state"], e["pid"]) for e in one.json()["engines"]}
    assert left == {"tiny": ("ready", pids["tiny"]), "tiny-c": ("ready", pids["tiny-c"])}
    assert alive(pids["tiny"]) and alive(pids["tiny-c"])
    assert gateway.engine("tiny-b")["state"] == "idle"
    drains = [h for h in gateway.state()["history"] if h["trigger"] == "drain"]
    assert [(h["model"], h["reason"]) for h in drains] == [("tiny-b", "unload requested")]

    everything = gateway.request("POST", "/gateway/unload")  # no body: every engine
    assert everything.status == 200, everything.body[:300]
    assert everything.json()["unloaded"] == "all" and everything.json()["engines"] == []
    assert not any(alive(pid) for pid in pids.values())
    assert gateway.state()["engines"] == []
    assert ask(gateway, "tiny-b").status == 200  # and it starts again on demand


def test_unload_refuses_a_body_that_names_no_model(start_gateway, tiny_models) -> None:
    gateway = start_gateway(three_models(tiny_models), max_engines=3)
    assert ask(gateway, "tiny").status == 200
    pid = pid_of(gateway, "tiny")
    for body in ({"model": None}, {"modle": "tiny"}, {"model": "tiny", "all": True}):
        refused = gateway.post("/gateway/unload", body)
        assert refused.status == 400, (body, refused.body[:300])
        assert refused.json()["error"]["param"] == "model"
    assert gateway.post("/gateway/unload", {"model": "nope"}).status == 404
    assert pid_of(gateway, "tiny") == pid and alive(pid)  # nothing was unloaded


def test_an_engine_of_a_model_a_reload_removed_can_be_unloaded_by_name(start_gateway, tiny_models) -> None:
    gateway = start_gateway(three_models(tiny_models), max_engines=3)
    assert ask(gateway, "tiny-c").status == 200
    pid = pid_of(gateway, "tiny-c")
    port = int(gateway.url.rsplit(":", 1)[1])
    gateway.config_path.write_text(lua_config(port, three_models(tiny_models)[:2], max_engines=3))
    assert gateway.post("/gateway/reload", {}).status == 200
    assert gateway.engine("tiny-c")["state"] == "ready"  # it still runs, serving what it took
    unloaded = gateway.post("/gateway/unload", {"model": "tiny-c"})
    assert unloaded.status == 200 and unloaded.json()["unloaded"] == "tiny-c", unloaded.body[:300]
    assert not alive(pid)
