"""Unusual but valid requests, and engine answers a client must never see as they are."""

from __future__ import annotations

import gzip
import json
import urllib.parse
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway, Response, tiny_model_config

CHAT = [{"role": "user", "content": "hi"}]
FAKE_ENGINE = str(Path(__file__).parent / "fakes" / "fake_engine.py")
ENGINE_FULL = "Context size has been exceeded"


def chat(max_tokens: int = 5, model: str = "tiny", **extra: Any) -> bytes:
    return json.dumps({"model": model, "messages": CHAT, "max_tokens": max_tokens, **extra}).encode()


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


def sse_events(body: bytes) -> list[str]:
    return [e[6:] for e in body.decode().split("\n\n") if e.startswith("data: ")]


@pytest.mark.parametrize(("encoding", "compress"), [("gzip", gzip.compress), ("deflate", zlib.compress)])
def test_a_compressed_request_body_is_served(gateway: Gateway, encoding: str, compress) -> None:
    resp = gateway.request(
        "POST", "/v1/chat/completions", raw=compress(chat()), headers={"Content-Encoding": encoding}
    )
    assert resp.status == 200, resp.body
    assert resp.json()["usage"]["completion_tokens"] == 5


def test_a_json_body_under_another_content_type_is_served(gateway: Gateway) -> None:
    for content_type in (
        "multipart/form-data; boundary=x",
        "text/plain",
        "application/x-www-form-urlencoded",
    ):
        resp = gateway.request(
            "POST", "/v1/chat/completions", raw=chat(), headers={"Content-Type": content_type}
        )
        assert resp.status == 200, (content_type, resp.body)
        assert resp.json()["usage"]["completion_tokens"] == 5


def set_names(gateway: Gateway, names: dict[str, str]) -> None:
    """Rename models in the running gateway's config (the test harness writes ASCII only)."""
    text = gateway.config_path.read_text()
    for old, new in names.items():
        text = text.replace(json.dumps(old), f'"{new}"')
    gateway.config_path.write_text(text, encoding="utf-8")
    assert gateway.post("/gateway/reload", {}).status == 200


def test_a_non_ascii_alias_is_given_back_as_asked(start_gateway, tiny_models) -> None:
    gateway = start_gateway(tiny_model_config(tiny_models, name="NAME", aliases=["ALIAS"]))
    set_names(gateway, {"NAME": "tïny", "ALIAS": "alias-日本"})
    for asked in ("alias-日本", "tïny"):
        plain = gateway.request("POST", "/v1/chat/completions", raw=chat(model=asked))
        assert plain.status == 200, plain.body
        assert plain.json()["model"] == asked
        streamed = gateway.request("POST", "/v1/chat/completions", raw=chat(model=asked, stream=True))
        chunks = [json.loads(e) for e in sse_events(streamed.body) if e != "[DONE]"]
        assert chunks and {c["model"] for c in chunks} == {asked}


def fake_model(mode: str) -> dict[str, Any]:
    return {"name": "fake", "binary": FAKE_ENGINE, "args": [mode], "variants": [{"context": 1024}]}


@pytest.mark.parametrize("stream", [False, True])
def test_an_engine_error_without_a_body_gets_openais_shape(start_gateway, stream: bool) -> None:
    gateway = start_gateway([fake_model("bare-error")])
    assert gateway.post("/gateway/load", {"model": "fake"}).status == 200  # no keep-alive comments
    resp = gateway.request("POST", "/v1/chat/completions", raw=chat(model="fake", stream=stream))
    assert resp.status == 415
    assert resp.headers["Content-Type"].startswith("application/json")
    error = assert_openai_error(resp)
    assert "415" in error["message"]


def ask_fake(gateway: Gateway, stream: bool) -> Response:
    return gateway.request("POST", "/v1/chat/completions", raw=chat(model="fake", stream=stream))


def requeues(gateway: Gateway) -> list[str]:
    return [line for line in gateway.log().splitlines() if "goes back to the queue" in line]


@pytest.mark.parametrize("stream", [False, True])
def test_an_engine_that_ran_out_of_cache_before_answering_gets_the_request_again(
    start_gateway, stream: bool
) -> None:
    gateway = start_gateway([fake_model("full-once")])
    assert gateway.post("/gateway/load", {"model": "fake"}).status == 200
    resp = ask_fake(gateway, stream)
    assert resp.status == 200, resp.body
    if stream:
        events = sse_events(resp.body)
        assert events[-1] == "[DONE]"
        assert json.loads(events[0])["choices"][0]["delta"]["content"] == "ok"
        assert ENGINE_FULL not in resp.body.decode()
    else:
        assert resp.json()["choices"][0]["message"]["content"] == "ok"
    assert len(requeues(gateway)) == 1 and ENGINE_FULL in requeues(gateway)[0]


def test_an_error_after_the_role_events_of_a_stream_is_still_before_any_byte(start_gateway) -> None:
    # llama-server's chat streams open with a role event per answer before the prompt is
    # processed: a KV failure after them has still sent the client nothing it needs.
    gateway = start_gateway([fake_model("full-after-role")])
    resp = ask_fake(gateway, stream=True)
    assert resp.status == 200, resp.body
    events = sse_events(resp.body)
    assert events[-1] == "[DONE]" and ENGINE_FULL not in resp.body.decode()
    assert len(requeues(gateway)) == 1


def test_an_engine_that_stays_out_of_cache_ends_the_request_after_three_tries(start_gateway) -> None:
    gateway = start_gateway([fake_model("full-always")])
    resp = ask_fake(gateway, stream=False)
    assert resp.status == 503
    error = assert_openai_error(resp)
    assert ENGINE_FULL in error["message"] and error["code"] == "service_unavailable"
    assert len(requeues(gateway)) == 3
    assert gateway.state()["in_flight"] == 0
