"""Which headers cross the hop to the engine and back. Pure."""

from __future__ import annotations

import json

import pytest

from gateway.server.proxy import Renamer, engine_request_headers, upstream_headers


@pytest.mark.parametrize("header", ["Connection", "Keep-Alive", "Transfer-Encoding", "Upgrade", "Host"])
def test_hop_by_hop_headers_do_not_pass(header: str) -> None:
    assert upstream_headers({header: "x", "X-Custom": "y"}) == {"X-Custom": "y"}


def test_headers_named_by_connection_do_not_pass() -> None:
    headers = {"Connection": "close, X-Secret-Hop", "X-Secret-Hop": "1", "X-Custom": "y"}
    assert upstream_headers(headers) == {"X-Custom": "y"}


def test_the_engine_never_sees_the_gateways_keys_and_answers_uncompressed() -> None:
    sent = engine_request_headers(
        {"Authorization": "Bearer k", "x-api-key": "k", "Accept-Encoding": "gzip", "X-Request-Id": "r1"}
    )
    assert sent == {"X-Request-Id": "r1", "Accept-Encoding": "identity", "Content-Type": "application/json"}


def test_the_body_is_described_by_the_gateway_not_the_client() -> None:
    # aiohttp already decompressed the body, and the engine reads JSON only.
    sent = engine_request_headers(
        {
            "Content-Type": "multipart/form-data; boundary=x",
            "Content-Encoding": "gzip",
            "Content-Length": "31",
            "Content-MD5": "abc",
            "X-Custom": "y",
        }
    )
    assert sent == {"X-Custom": "y", "Accept-Encoding": "identity", "Content-Type": "application/json"}


@pytest.mark.parametrize(
    "engine_wrote",
    [
        '{"model":"tïny","x":1}',
        '{"model": "tïny","x":1}',
        '{"model" : "tïny","x":1}',
        '{"model":"t\\u00efny","x":1}',
    ],
)
def test_a_non_ascii_name_is_renamed_however_the_engine_writes_it(engine_wrote: str) -> None:
    renamer = Renamer.between("tïny", "alias-日本")
    assert renamer is not None
    renamed = json.loads(renamer(engine_wrote.encode()))
    assert renamed == {"model": "alias-日本", "x": 1}


def test_only_the_model_field_is_renamed() -> None:
    renamer = Renamer.between("tïny", "alias-日本")
    assert renamer is not None
    body = '{"model":"tïnyx","content":"\\"model\\":\\"tïny\\""}'.encode()
    assert renamer(body) == body
