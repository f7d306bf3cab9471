"""Unusual but valid requests, and engine answers a client must never see as they are."""

from __future__ import annotations

import urllib.parse
import urllib.request
from typing import Any

import pytest

from tests.conftest import Gateway, Response, tiny_model_config


def assert_openai_error(resp: Response) -> dict[str, Any]:
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert isinstance(error["message"], str) and error["message"]
    return error


@pytest.fixture
def gateway(start_gateway, tiny_models) -> Gateway:
    return start_gateway(tiny_model_config(tiny_models))


def log_marker(gateway: Gateway, marker: str) -> None:
    """One log line with `marker` in it: the 404 of a request for no model."""
    resp = gateway.post("/v1/chat/completions", {"model": "nope"}, headers={"X-Request-Id": marker})
    assert resp.status == 404


def test_log_line_counts(gateway: Gateway) -> None:
    for marker in ("marker-1", "marker-2", "marker-3"):
        log_marker(gateway, marker)
    assert gateway.request("GET", "/gateway/logs?lines=0").body == b""
    two = gateway.request("GET", "/gateway/logs?lines=2").body.decode().splitlines(keepends=True)
    assert len(two) == 2 and "marker-2" in two[0] and "marker-3" in two[1] and two[1].endswith("\n")
    for path in ("/gateway/logs", "/gateway/logs/stream"):
        for bad in ("²", "-1", "1.5", "x"):
            resp = gateway.request("GET", f"{path}?lines={urllib.parse.quote(bad)}")
            assert resp.status == 400, (path, bad)
            assert assert_openai_error(resp)["param"] == "lines"


def test_the_live_log_with_no_backlog_starts_with_the_next_line(gateway: Gateway) -> None:
    with urllib.request.urlopen(gateway.url + "/gateway/logs/stream?lines=0", timeout=20) as stream:
        log_marker(gateway, "marker-0042")  # headers arrived: the stream follows the log now
        first = next(line for line in stream if line.startswith(b"data: "))
    assert b"marker-0042" in first
