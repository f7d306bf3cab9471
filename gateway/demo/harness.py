"""Writing gateway configs from Python values: shared by the tests and the benchmarks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def to_lua(value: Any) -> str:
    """A Lua literal for a JSON-like Python value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "{" + ", ".join(to_lua(v) for v in value) + "}"
    return "{" + ", ".join(f"[{json.dumps(k)}] = {to_lua(v)}" for k, v in value.items()) + "}"


def lua_config(port: int, models: list[dict[str, Any]], **server: Any) -> str:
    """A config file's text: loopback on `port`, short timeouts unless given (no
    shutdown_delay: no load balancer watches these gateways)."""
    server = {
        "listen_v4": f"127.0.0.1:{port}",
        "engine_startup_timeout": 30,
        "drain_timeout": 10,
        "stop_timeout": 5,
        "shutdown_delay": 0,
        **server,
    }
    return f"server = {to_lua(server)}\nmodels = {to_lua(models)}\n"


def spawn_gateway(
    config: Path, log_path: Path, log_level: str = "debug", *extra_args: str
) -> subprocess.Popen[bytes]:
    """`python -m gateway` on `config`, its output into `log_path`."""
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "--config", str(config), "--log-level", log_level, *extra_args],
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_healthy(
    url: str, process: subprocess.Popen[bytes], timeout: float = 20, path: str = "/health"
) -> None:
    """Until GET `path` answers 200; fails at once if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with {process.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url + path, timeout=1) as resp:
            if resp.status == 200:
                return
        time.sleep(0.02)
    raise RuntimeError(f"{url}{path} did not answer 200 in {timeout:g}s")


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM and wait; SIGKILL if it does not stop in `timeout`. The exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()
