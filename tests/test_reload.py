"""Reloads of a real gateway: one at a time, the latest file wins, and a config that never
ends is stopped (at its time limit, or at once by SIGTERM) without leaving Lua running."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gateway.demo.harness import lua_config
from tests.conftest import Gateway, wait_until

QUEUED = "config reload asked for while one runs"
RUNAWAY = "while true do end\n"


def write_config(gw: Gateway, name: str, lua: str = "", **server: object) -> None:
    """Rewrite the gateway's config file: one model called `name`, then `lua`."""
    port = int(gw.url.rsplit(":", 1)[1])
    gw.config_path.write_text(lua_config(port, models(name), **server) + lua)


def models(name: str) -> list[dict[str, object]]:
    return [{"name": name, "args": ["-m", "never-started.gguf"], "variants": [{"context": 512}]}]


def model_names(gw: Gateway) -> list[str]:
    return [m["id"] for m in gw.request("GET", "/v1/models").json()["data"]]


def lua_processes(config: Path) -> list[int]:
    """The Lua processes (python-lua-helper's loader.lua) running `config`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.endswith(b"loader.lua") for arg in cmdline) and str(config).encode() in cmdline:
            found.append(int(proc.name))
    return found


def touch(path: Path) -> str:
    """Lua that creates `path`: the config's way of saying how far it got."""
    return f"io.open({json.dumps(str(path))}, 'a'):write('run\\n'):close()\n"


def test_overlapping_reloads_leave_the_latest_file_in_force(start_gateway, tmp_path: Path) -> None:
    gw = start_gateway(models("first"))
    started = tmp_path / "slow-started"
    write_config(gw, "slow", touch(started) + 'os.execute("sleep 1.5")\n')
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(gw.post, "/gateway/reload", {})
        wait_until(started.exists)  # the slow run has read the file
        write_config(gw, "latest")
        latest = gw.post("/gateway/reload", {})
        assert (slow.result().status, latest.status) == (200, 200)
    assert model_names(gw) == ["latest"]
    assert latest.json()["models"] == ["latest"]


def test_reloads_asked_for_during_a_reload_share_one_more_run(start_gateway, tmp_path: Path) -> None:
    gw = start_gateway(models("first"))
    runs, gate = tmp_path / "runs", tmp_path / "gate"
    wait_for_gate = f"while not io.open({json.dumps(str(gate))}) do os.execute('sleep 0.02') end\n"
    write_config(gw, "second", touch(runs) + wait_for_gate)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(gw.post, "/gateway/reload", {})
        wait_until(runs.exists)
        others = [pool.submit(gw.post, "/gateway/reload", {}) for _ in range(3)]
        wait_until(lambda: gw.log().count(QUEUED) == 3)
        gate.touch()
        statuses = [f.result().status for f in (first, *others)]
    assert statuses == [200] * 4
    assert runs.read_text().splitlines() == ["run", "run"]  # the first, and one for the other three
    assert model_names(gw) == ["second"]


def test_a_config_that_never_ends_is_stopped_and_the_old_one_stays(start_gateway) -> None:
    gw = start_gateway(models("first"), config_timeout=1)
    write_config(gw, "second", RUNAWAY, config_timeout=1)
    started = time.monotonic()
    response = gw.post("/gateway/reload", {}, timeout=30)
    assert time.monotonic() - started < 10
    assert response.status == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "did not finish running within 1s (server.config_timeout), so it was stopped" in error["message"]
    assert lua_processes(gw.config_path) == []  # killed, not left at 100% CPU
    assert model_names(gw) == ["first"]
    assert "config reload rejected, keeping the old config" in gw.log()
    # The old config's limit stays too: a good file loads again.
    write_config(gw, "third", config_timeout=1)
    assert gw.post("/gateway/reload", {}).status == 200
    assert model_names(gw) == ["third"]


def test_sighups_during_a_runaway_reload_run_one_lua_and_sigterm_ends_it(start_gateway) -> None:
    gw = start_gateway(models("first"), config_timeout=120)
    write_config(gw, "second", RUNAWAY)
    gw.process.send_signal(signal.SIGHUP)
    wait_until(lambda: lua_processes(gw.config_path))
    for queued in (1, 2):
        gw.process.send_signal(signal.SIGHUP)
        wait_until(lambda n=queued: gw.log().count(QUEUED) == n)
    assert len(lua_processes(gw.config_path)) == 1
    started = time.monotonic()
    assert gw.stop(timeout=30) == 0
    assert time.monotonic() - started < 5
    assert lua_processes(gw.config_path) == []
