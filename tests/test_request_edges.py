"""Request headers a client controls, against a real gateway: an `X-Request-Id` that is
not a sane id, and a `Content-Encoding` the body does not match. Each gets an answer in
OpenAI's shape and leaves the gateway (and its log) working."""

from __future__ import annotations

import gzip
import http.client
import json
import re
import urllib.request
import zlib
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


BODY = json.dumps(CHAT).encode()
WRONG_ENCODINGS = {
    "gzip, body plain": ("gzip", BODY, 400),
    "deflate, body plain": ("deflate", BODY, 400),
    "gzip, body cut short": ("gzip", gzip.compress(BODY)[:20], 400),
    "gzip over deflate, body only gzipped": ("deflate, gzip", gzip.compress(BODY), 400),
    "br": ("br", BODY, 415),
    "zstd": ("zstd", BODY, 415),
    "unknown": ("x-unknown", BODY, 415),
}


@pytest.mark.parametrize(("encoding", "body", "status"), WRONG_ENCODINGS.values(), ids=WRONG_ENCODINGS.keys())
def test_a_body_its_content_encoding_does_not_describe_gets_an_openai_error(
    gateway: Gateway, encoding: str, body: bytes, status: int
) -> None:
    answer = send(gateway, "/v1/chat/completions", body, {"Content-Encoding": encoding})
    assert answer[0] == status, answer
    error = openai_error(answer[2])
    assert error["type"] == "invalid_request_error", error
    assert encoding.split(", ")[0] in error["message"], error
    if status == 415:
        assert answer[1]["Accept-Encoding"] == "gzip, deflate"
    assert "Traceback" not in gateway.log()
    assert gateway.request("GET", "/health").status == 200


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("GZIP", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda b: zlib.compress(b, wbits=-15)),  # raw deflate, no zlib header
        ("identity", bytes),
        ("gzip, deflate", lambda b: zlib.compress(gzip.compress(b))),
        ("gzip", lambda b: gzip.compress(b[:10]) + gzip.compress(b[10:])),  # two members
    ],
    ids=["gzip", "x-gzip", "GZIP", "deflate", "raw deflate", "identity", "gzip then deflate", "two members"],
)
def test_a_body_encoded_as_it_says_is_served(gateway: Gateway, encoding: str, compress: Any) -> None:
    status, _, answer = send(gateway, "/v1/chat/completions", compress(BODY), {"Content-Encoding": encoding})
    assert status == 200, answer
    assert json.loads(answer)["choices"]


def test_a_compressed_body_is_held_to_max_body_bytes_once_decoded(gateway: Gateway) -> None:
    padded = {**CHAT, "pad": "x" * (8 * 1024 * 1024)}  # just over the default 8 MiB
    body = gzip.compress(json.dumps(padded).encode())
    assert len(body) < 100_000
    status, _, answer = send(gateway, "/v1/chat/completions", body, {"Content-Encoding": "gzip"})
    assert status == 413, answer
    assert "too large" in openai_error(answer)["message"]
