"""Fixtures that run the real gateway (a subprocess) in front of a real llama-server."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.demo.harness import free_port, lua_config, spawn_gateway, stop_process, wait_healthy
from gateway.demo.tinymodel import write_tiny_model
from gateway.engine.binary import BinaryNotFound, find_llama_server


@pytest.fixture(scope="session")
def llama_server() -> str:
    try:
        return find_llama_server(None)
    except BinaryNotFound as exc:
        pytest.fail(f"{exc}: run `make engine` (the engine tests need a real llama-server)")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {
        "tiny": write_tiny_model(folder / "tiny.gguf", seed=1),
        "tiny-b": write_tiny_model(folder / "tiny-b.gguf", seed=2),
    }


def engine_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-x", "llama-server"], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # gone between open and read: ProcessLookupError
        return False
    return state != "Z"


def wait_until(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Gateway:
    url: str
    process: subprocess.Popen[bytes]
    config_path: Path
    log_path: Path

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 60,
        headers_only: bool = False,
    ) -> Response:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return Response(resp.status, dict(resp.headers), b"" if headers_only else resp.read())
        except urllib.error.HTTPError as err:
            return Response(err.code, dict(err.headers), err.read())

    def post(self, path: str, body: Any, **kw: Any) -> Response:
        return self.request("POST", path, body, **kw)

    def state(self) -> dict[str, Any]:
        return self.request("GET", "/gateway/state").json()

    def engine(self, model: str | None = None) -> dict[str, Any]:
        """The engine of `model` in /gateway/state (without one: the only engine, for
        tests that run one at a time); an idle stand-in when none runs."""
        engines = self.state()["engines"]
        mine = [e for e in engines if model is None or e["model"] == model]
        assert model is not None or len(mine) <= 1, engines
        idle = {"state": "idle", "model": model, "pid": None, "variant": None, "port": None}
        return mine[0] if mine else idle

    def engine_pids(self) -> list[int]:
        return [e["pid"] for e in self.state()["engines"] if e["pid"]]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if sig == signal.SIGTERM:
            return stop_process(self.process, timeout)
        self.process.send_signal(sig)
        return self.process.wait(timeout)


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    text = gateway.request("GET", "/metrics").body.decode()
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def tiny_model_config(models: dict[str, Path], **overrides: Any) -> list[dict[str, Any]]:
    """The two demo models: tiny with three variants, tiny-b with one."""
    tiny = {
        "name": "tiny",
        "aliases": ["tiny-chat"],
        "args": ["-m", str(models["tiny"]), "-t", "1"],
        "default_max_tokens": 64,
        "request": {"defaults": {"temperature": 0}},
        "variants": [{"context": 512}, {"context": 2048}, {"context": 8192}],
    }
    tiny_b = {
        "name": "tiny-b",
        "args": ["-m", str(models["tiny-b"]), "-t", "1"],
        "default_max_tokens": 64,
        "request": {"defaults": {"temperature": 0}},
        "variants": [{"context": 2048}],
    }
    tiny.update(overrides)
    return [tiny, tiny_b]


@pytest.fixture
def start_gateway(tmp_path: Path, llama_server: str) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def start(models: list[dict[str, Any]], **server: Any) -> Gateway:
        port = free_port()
        config = tmp_path / f"gateway-{port}.cfg.lua"
        config.write_text(lua_config(port, models, **server))
        log_path = tmp_path / f"gateway-{port}.log"
        process = spawn_gateway(config, log_path)
        gw = Gateway(f"http://127.0.0.1:{port}", process, config, log_path)
        started.append(gw)
        try:
            wait_healthy(gw.url, process)
        except RuntimeError as exc:
            raise AssertionError(f"{exc}:\n{gw.log()}") from None
        return gw

    yield start
    problems = [problem for gw in started if (problem := _stop_and_check(gw))]
    assert not problems, "\n".join(problems)


def _stop_and_check(gw: Gateway) -> str | None:
    """Stop a gateway the test left running (always); what went wrong, if anything."""
    if gw.process.poll() is not None:
        return None  # the test ended it and checked how
    try:
        pids = gw.engine_pids()
    except (OSError, ValueError, KeyError):  # also when /gateway/state needs a key
        pids = []
    code = gw.stop()
    if code != 0:
        return f"gateway exit code {code}:\n{gw.log()[-3000:]}"
    try:
        wait_until(lambda: not any(alive(pid) for pid in pids), timeout=5)
    except AssertionError:
        return f"engines {[pid for pid in pids if alive(pid)]} outlived their gateway"
    return None


@pytest.fixture(scope="session", autouse=True)
def no_engine_outlives_the_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every engine the tests started runs a model under the suite's temp folder: none of
    them may still run when the suite ends (they are killed, and the suite fails)."""
    yield
    base = str(tmp_path_factory.getbasetemp())

    def leftovers() -> list[int]:
        return [pid for pid in engine_pids() if base in _cmdline(pid)]

    with contextlib.suppress(AssertionError):
        wait_until(lambda: not leftovers(), timeout=5)
    leaked = leftovers()
    for pid in leaked:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not leaked, f"engines outlived the tests: {leaked}"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture(scope="session")
def haproxy_binary() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    if found is None:
        pytest.fail("haproxy is missing: run `make setup` (it installs Debian's haproxy)")
    return found


def launch_haproxy(binary: str, config_path: Path, url: str) -> Gateway:
    """HAProxy in the foreground on a config (`llm-gateway front`'s) that listens at `url`,
    once GET /health through it answers 200 (a gateway behind it is up). A Gateway, for
    its request helpers."""
    log_path = config_path.with_suffix(".log")
    process = subprocess.Popen(
        [binary, "-db", "-f", str(config_path)], stdout=log_path.open("wb"), stderr=subprocess.STDOUT
    )
    front = Gateway(url, process, config_path, log_path)
    try:
        wait_healthy(url, process)
    except RuntimeError as exc:
        stop_process(process, timeout=10)
        raise AssertionError(f"{exc}:\n{front.log()}") from None
    return front


@pytest.fixture
def start_haproxy(tmp_path: Path, haproxy_binary: str) -> Iterator[Callable[[str, str], Gateway]]:
    """launch_haproxy on a config's text; stopped after the test."""
    started: list[Gateway] = []

    def start(config: str, url: str) -> Gateway:
        path = tmp_path / f"haproxy-{len(started)}.cfg"
        path.write_text(config)
        started.append(launch_haproxy(haproxy_binary, path, url))
        return started[-1]

    yield start
    for front in started:
        stop_process(front.process, timeout=10)
