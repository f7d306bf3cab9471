"""Context-aware variant selection against the real engine (the tiny model: 1 token per byte)."""

from __future__ import annotations

import pytest

from tests.conftest import Gateway, tiny_model_config


def chat(gateway: Gateway, text_bytes: int, max_tokens: int | None = 8, model: str = "tiny"):
    body = {"model": model, "messages": [{"role": "user", "content": "a" * text_bytes}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if max_tokens is None or max_tokens > 100:  # only the choice matters: headers, no stream
        return gateway.post("/v1/chat/completions", {**body, "stream": True}, headers_only=True)
    return gateway.post("/v1/chat/completions", body)


def starts(gateway: Gateway) -> list[str]:
    return [h["reason"].rsplit(" ", 1)[-1] for h in gateway.state()["history"] if h["trigger"] == "start"]


@pytest.fixture
def gateway(start_gateway, tiny_models) -> Gateway:
    return start_gateway(tiny_model_config(tiny_models))


def test_smallest_then_up_then_reuse_then_reject(gateway: Gateway) -> None:
    short = chat(gateway, 100)
    assert short.status == 200 and short.headers["X-Gateway-Context"] == "512"
    middle = chat(gateway, 1000)
    assert middle.status == 200 and middle.headers["X-Gateway-Context"] == "2048"
    assert middle.json()["usage"]["prompt_tokens"] > 1000
    again = chat(gateway, 100)
    assert again.headers["X-Gateway-Context"] == "2048"  # no downsizing swap
    assert starts(gateway) == ["tiny@512", "tiny@2048"]
    history = len(gateway.state()["history"])
    too_big = chat(gateway, 9000)
    assert too_big.status == 400
    error = too_big.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "8192" in error["message"] and "8 reserved" in error["message"]
    assert len(gateway.state()["history"]) == history  # nothing started or stopped


def test_max_tokens_and_default_max_tokens_move_the_choice(gateway: Gateway) -> None:
    assert chat(gateway, 50, max_tokens=600).headers["X-Gateway-Context"] == "2048"
    assert chat(gateway, 50, max_tokens=3000).headers["X-Gateway-Context"] == "8192"
    # tiny's default_max_tokens is 64: 400 prompt tokens + 64 fit 512, with 200 they do not.
    assert chat(gateway, 400, max_tokens=None).headers["X-Gateway-Context"] == "8192"  # reused


def test_default_max_tokens_decides_when_the_request_names_none(start_gateway, tiny_models):
    gateway = start_gateway(tiny_model_config(tiny_models, default_max_tokens=300))
    assert chat(gateway, 100, max_tokens=None).headers["X-Gateway-Context"] == "512"
    assert chat(gateway, 300, max_tokens=None).headers["X-Gateway-Context"] == "2048"


def test_cold_estimate_too_low_ends_on_the_right_variant_with_one_upgrade(gateway: Gateway) -> None:
    # Nothing runs: the default ratio (0.5 tokens/byte) guesses ~350 tokens for 700 bytes,
    # so 512 starts; the exact count (~710) moves it to 2048 before anything is sent.
    resp = chat(gateway, 700)
    assert resp.status == 200 and resp.headers["X-Gateway-Context"] == "2048"
    assert starts(gateway) == ["tiny@512", "tiny@2048"]
    state = gateway.state()
    assert state["counters"]["requeued"] == 1
    outcomes = [(s["context"], s["outcome"], s["method"]) for s in state["selections"]]
    assert outcomes[0] == (512, "started", "estimate")
    assert outcomes[-1] == (2048, "upgraded", "exact")


def test_learned_ratio_picks_right_first_time(gateway: Gateway) -> None:
    chat(gateway, 700)  # teaches the estimator about 1 token per byte
    chat(gateway, 100, model="tiny-b")  # another model runs now
    before = len(starts(gateway))
    assert chat(gateway, 1500).headers["X-Gateway-Context"] == "2048"
    assert starts(gateway)[before:] == ["tiny@2048"]


def test_parallel_slots_without_unified_cache_halve_the_context(start_gateway, tiny_models):
    models = tiny_model_config(
        tiny_models, variants=[{"context": 2048, "args": ["-np", "2"]}, {"context": 4096}]
    )
    gateway = start_gateway(models)
    first = chat(gateway, 100)
    assert first.headers["X-Gateway-Context"] == "2048"
    assert gateway.engine()["slot_context"] == 1024
    bigger = chat(gateway, 1500)  # fits 2048, not a 1024 slot
    assert bigger.status == 200 and bigger.headers["X-Gateway-Context"] == "4096"
