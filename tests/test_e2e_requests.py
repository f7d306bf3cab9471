"""Request handling details against the real engine: rewriting, waiting, cancelling, routing."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from pathlib import Path

from tests.conftest import Gateway, tiny_model_config, wait_until

CHAT = [{"role": "user", "content": "hi"}]
FAKE_ENGINE = str(Path(__file__).parent / "fakes" / "fake_engine.py")


def ask(gateway: Gateway, model: str = "tiny", max_tokens: int = 4, **extra):
    return gateway.post(
        "/v1/chat/completions", {"model": model, "messages": CHAT, "max_tokens": max_tokens, **extra}
    )


def hold_engine(gateway: Gateway, max_tokens: int = 3000) -> threading.Thread:
    """A long request on tiny that keeps its engine busy (and a swap waiting)."""
    thread = threading.Thread(target=ask, args=(gateway,), kwargs={"max_tokens": max_tokens})
    thread.start()
    wait_until(lambda: gateway.state()["in_flight"] == 1, interval=0.002)
    return thread


def test_request_rules_default_force_and_strip(start_gateway, tiny_models) -> None:
    rules = {"defaults": {"max_tokens": 7}, "force": {"n_probs": 2}, "strip": ["logit_bias"]}
    gateway = start_gateway(tiny_model_config(tiny_models, request=rules))
    body = {"model": "tiny", "messages": CHAT, "temperature": 0, "logit_bias": {"97": 100}}
    answer = gateway.post("/v1/chat/completions", body).json()
    assert answer["usage"]["completion_tokens"] == 7  # default applied
    assert "logprobs" in answer["choices"][0]  # forced n_probs made the engine add them
    biased = gateway.post("/v1/chat/completions", {**body, "max_tokens": 30}).json()
    assert set(biased["choices"][0]["message"]["content"]) != {"a"}  # the bias was stripped
    given = gateway.post("/v1/chat/completions", {**body, "max_tokens": 3}).json()
    assert given["usage"]["completion_tokens"] == 3  # the client's own value wins a default


def test_streams_waiting_for_a_swap_get_loading_comments(start_gateway, tiny_models) -> None:
    gateway = start_gateway(tiny_model_config(tiny_models))
    ask(gateway, max_tokens=3000)  # tiny@8192 runs
    holder = hold_engine(gateway)
    body = json.dumps({"model": "tiny-b", "messages": CHAT, "max_tokens": 3, "stream": True})
    req = urllib.request.Request(
        gateway.url + "/v1/chat/completions", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        text = resp.read().decode()
    holder.join(30)
    assert text.startswith(": waiting for model tiny-b\n\n")
    events = [e for e in text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["model"] == "tiny-b"


def test_a_client_gone_while_queued_causes_no_swap(start_gateway, tiny_models) -> None:
    gateway = start_gateway(tiny_model_config(tiny_models))
    ask(gateway, max_tokens=3000)
    holder = hold_engine(gateway, max_tokens=1500)
    starts, pid = gateway.state()["counters"]["starts"], gateway.engine()["pid"]
    port = int(gateway.url.rsplit(":", 1)[1])
    body = json.dumps({"model": "tiny-b", "messages": CHAT, "max_tokens": 3}).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        wait_until(lambda: gateway.state()["queued"]["count"] == 1, interval=0.002)
    wait_until(lambda: gateway.state()["queued"]["count"] == 0, timeout=2, interval=0.002)
    holder.join(30)
    time.sleep(0.2)
    state, engine = gateway.state(), gateway.engine()
    assert (engine["state"], engine["model"], engine["pid"]) == ("ready", "tiny", pid)
    assert state["counters"]["starts"] == starts
    assert state["counters"]["cancelled_waiting"] == 1
    assert [h["trigger"] for h in state["history"]][-2:] == ["drain", "resume"]


def test_a_full_queue_answers_503_with_retry_after(start_gateway, tiny_models) -> None:
    gateway = start_gateway(tiny_model_config(tiny_models), queue_limit=1)
    ask(gateway, max_tokens=3000)
    holder = hold_engine(gateway)
    waiting = threading.Thread(target=ask, args=(gateway, "tiny-b"))
    waiting.start()
    wait_until(lambda: gateway.state()["queued"]["count"] == 1, interval=0.002)
    refused = ask(gateway, "tiny-b")
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "service_unavailable"
    holder.join(30)
    waiting.join(30)


def test_anthropic_messages_and_count_tokens_are_routed_by_model(start_gateway, tiny_models) -> None:
    gateway = start_gateway(tiny_model_config(tiny_models))
    body = {"model": "tiny-chat", "max_tokens": 5, "messages": [{"role": "user", "content": "hello"}]}
    message = gateway.post("/v1/messages", body)
    assert message.status == 200 and message.json()["type"] == "message"
    assert message.json()["model"] == "tiny-chat"
    counted = gateway.post("/v1/messages/count_tokens", body)
    assert counted.status == 200 and counted.json()["input_tokens"] > 5
    assert gateway.post("/v1/messages", {"model": "tiny"}).status == 400


def test_embeddings_on_a_model_started_with_embeddings(start_gateway, tiny_models) -> None:
    embedder = {
        "name": "embed",
        "args": ["-m", str(tiny_models["tiny"]), "-t", "1", "--embeddings", "--pooling", "mean"],
        "variants": [{"context": 512}],
    }
    gateway = start_gateway([embedder, *tiny_model_config(tiny_models)])
    resp = gateway.post("/v1/embeddings", {"model": "embed", "input": ["hello", "world"]})
    assert resp.status == 200
    data = resp.json()["data"]
    assert len(data) == 2 and len(data[0]["embedding"]) == 64
    assert resp.json()["model"] == "embed"


def test_engine_context_error_is_retried_on_a_larger_variant(start_gateway, tiny_models) -> None:
    undercounting = {
        "name": "fake",
        "binary": FAKE_ENGINE,
        "args": ["undercount"],
        "variants": [{"context": 1024}, {"context": 4096}],
    }
    gateway = start_gateway([undercounting, *tiny_model_config(tiny_models)])
    resp = ask(gateway, "fake")
    assert resp.status == 200 and resp.headers["X-Gateway-Context"] == "4096"
    assert resp.json()["choices"][0]["message"]["content"] == "ok"
    selections = gateway.state()["selections"]
    assert (selections[-1]["prompt_tokens"], selections[-1]["context"]) == (1500, 4096)
