"""An openai engine whose token counting is broken: the request gets a clear 502 in
OpenAI's shape, never a 500 or a hang (fakes: no real server counts wrongly on demand)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

FAKE = str(Path(__file__).with_name("fakes") / "fake_engine.py")


def counting_model(mode: str, count: str) -> dict[str, Any]:
    return {
        "name": "f",
        "engine": "openai",
        "count": count,
        "command": [sys.executable, FAKE, mode, "--port", "${PORT}"],
        "health_check_timeout": 1,
        "variants": [{"context": 512}, {"context": 4096}],
    }


@pytest.mark.parametrize(
    ("mode", "count", "words"),
    [
        ("count-garbage", "vllm", "token count could not be read"),
        ("count-missing", "llama.cpp", "does not offer the token count"),
        ("count-hangs", "vllm", "counting took over 1s"),
    ],
)
def test_broken_counting_is_a_clear_502(start_gateway, mode: str, count: str, words: str) -> None:
    gw = start_gateway([counting_model(mode, count)])
    began = time.monotonic()
    reply = gw.post("/v1/chat/completions", {"model": "f", "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status == 502, reply.body
    error = reply.json()["error"]
    assert words in error["message"] and error["code"] == "engine_error"
    assert time.monotonic() - began < 10
    assert "Traceback" not in gw.log()
