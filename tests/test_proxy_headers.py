"""Which headers cross the hop to the engine and back. Pure."""

from __future__ import annotations

import pytest

from gateway.server.proxy import engine_request_headers, upstream_headers


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
    assert sent == {"X-Request-Id": "r1", "Accept-Encoding": "identity"}
