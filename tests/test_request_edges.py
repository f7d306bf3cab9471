"""Request headers a client controls, against a real gateway: an `X-Request-Id` that is
not a sane id, and a `Content-Encoding` the body does not match. Each gets an answer in
OpenAI's shape and leaves the gateway (and its log) working."""

from __future__ import annotations

import http.client
import json
import re
import urllib.request
from typing import Any

import pytest

from tests.conftest import Gateway, tiny_model_config

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
SANE_ID = re.compile(r"[!-~]{1,128}")  # printable ASCII, no space


@pytest.fixture
def gateway(start_gateway, tiny_models) -> Gateway:
    return start_gateway(tiny_model_config(tiny_models))


def send(
    gw: Gateway, path: str, body: bytes, headers: dict[str, bytes | str]
) -> tuple[int, dict[str, str], bytes]:
    """A POST with header values as given (bytes go out as they are)."""
    conn = http.client.HTTPConnection(gw.url.removeprefix("http://"), timeout=60)
    try:
        conn.putrequest("POST", path)
        for name, value in {"Content-Type": "application/json", **headers}.items():
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def openai_error(body: bytes) -> dict[str, Any]:
    error = json.loads(body)["error"]
    assert set(error) >= {"message", "type", "code"}, error
    return error


ODD_IDS = {
    "not UTF-8": b"ab\xffcd",
    "UTF-8 but not ASCII": "caf\u00e9".encode(),
    "too long": b"x" * 129,
    "a space": b"a b",
}


@pytest.mark.parametrize("rid", ODD_IDS.values(), ids=ODD_IDS.keys())
def test_an_odd_request_id_is_replaced_and_the_log_stays_readable(gateway: Gateway, rid: bytes) -> None:
    with urllib.request.urlopen(gateway.url + "/gateway/logs/stream?lines=0", timeout=10) as stream:
        for model in ("nope", "tiny"):  # an error answer, then a served one
            body = json.dumps({**CHAT, "model": model}).encode()
            status, headers, answer = send(gateway, "/v1/chat/completions", body, {"X-Request-Id": rid})
            assert status == (404 if model == "nope" else 200), answer
            assert SANE_ID.fullmatch(headers["X-Request-Id"]), headers
        logs = gateway.request("GET", "/gateway/logs")
        assert logs.status == 200, logs.body
        body = json.dumps({"model": "nope"}).encode()
        assert send(gateway, "/v1/chat/completions", body, {"X-Request-Id": "after-odd-id"})[0] == 404
        # The live log was not cut: it goes on to the line of the request after.
        assert any(b"after-odd-id" in line for line in stream), "the live log stream ended"


def test_a_sane_request_id_is_kept(gateway: Gateway) -> None:
    rid = "Req-" + "x" * 124  # 128 printable characters
    status, headers, _ = send(
        gateway, "/v1/chat/completions", json.dumps(CHAT).encode(), {"X-Request-Id": rid}
    )
    assert (status, headers["X-Request-Id"]) == (200, rid)
