"""The OpenAI-compatible surface, end to end: the openai SDK, a real gateway, a real engine."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.conftest import Gateway, tiny_model_config, wait_until

CHAT = [{"role": "user", "content": "Say something."}]
GOOD_CHAT = json.dumps({"model": "tiny", "messages": CHAT, "max_tokens": 2}).encode()


@pytest.fixture
def gateway(start_gateway, tiny_models) -> Gateway:
    return start_gateway(tiny_model_config(tiny_models), max_body_bytes=65536)


@pytest.fixture
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)


def engine_url(gateway: Gateway) -> str:
    return f"http://127.0.0.1:{gateway.engine()['port']}"


def direct_stream(url: str, body: dict) -> list[dict]:
    """The same request straight to the engine: its SSE events, parsed."""
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req) as resp:
        lines = resp.read().decode().split("\n\n")
    return [json.loads(e[6:]) for e in lines if e.startswith("data: {")]


def comparable(chunk: dict) -> tuple:
    return tuple(
        (c["index"], c.get("delta", {}).get("content"), c.get("finish_reason"))
        for c in chunk.get("choices", [])
    )


def test_chat_through_the_sdk_keeps_the_alias(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="tiny-chat", messages=CHAT, max_tokens=12)
    assert reply.model == "tiny-chat"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12
    again = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12)
    assert again.model == "tiny"
    assert again.choices[0].message.content == reply.choices[0].message.content


def test_stream_matches_the_engine_event_for_event(client: openai.OpenAI, gateway: Gateway) -> None:
    body = {
        "model": "tiny-chat",
        "messages": CHAT,
        "max_tokens": 24,
        "stream": True,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    through = list(client.chat.completions.create(**body))
    direct = direct_stream(engine_url(gateway), body)
    assert [comparable(c.model_dump()) for c in through] == [comparable(c) for c in direct]
    assert {c.model for c in through} == {"tiny-chat"}
    assert through[-1].usage.completion_tokens == 24


def test_completions_with_n_and_stop(client: openai.OpenAI) -> None:
    plain = client.completions.create(model="tiny", prompt="Once upon", max_tokens=16)
    text = plain.choices[0].text
    assert len(text) > 2 and plain.choices[0].finish_reason == "length"
    stop = text[3:5]
    stopped = client.completions.create(model="tiny", prompt="Once upon", max_tokens=16, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].text
    many = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, n=2)
    assert [c.index for c in many.choices] == [0, 1]


def test_streamed_completion(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model="tiny", prompt="abc", max_tokens=8, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) != ""
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_list_has_every_name_and_context(gateway: Gateway) -> None:
    models = gateway.request("GET", "/v1/models").json()
    by_id = {m["id"]: m for m in models["data"]}
    assert set(by_id) == {"tiny", "tiny-chat", "tiny-b"}
    assert by_id["tiny-chat"]["context_length"] == 8192
    assert by_id["tiny-b"]["meta"]["n_ctx"] == 2048
    assert all(m["owned_by"] == "llm-gateway" and m["object"] == "model" for m in models["data"])


def test_request_id_and_context_headers(gateway: Gateway) -> None:
    resp = gateway.post(
        "/v1/chat/completions",
        {"model": "tiny", "messages": CHAT, "max_tokens": 2},
        headers={"X-Request-Id": "abc-123"},
    )
    assert resp.status == 200
    assert resp.headers["X-Request-Id"] == "abc-123"
    assert resp.headers["X-Gateway-Context"] == "512"
    generated = gateway.post("/v1/chat/completions", {"model": "nope", "messages": CHAT})
    assert len(generated.headers["X-Request-Id"]) == 16


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (b"{not json", 400, "invalid_request", None),
        (b"[1, 2]", 400, "invalid_request", None),
        (b"\xff\xfe{}", 400, "invalid_request", None),
        # JSON that Python reads but llama-server refuses: the gateway's own 400.
        (GOOD_CHAT[:-1] + b', "temperature": NaN}', 400, "invalid_request", None),
        (GOOD_CHAT[:-1] + b', "temperature": Infinity}', 400, "invalid_request", None),
        (GOOD_CHAT[:-1] + b', "temperature": -Infinity}', 400, "invalid_request", None),
        (GOOD_CHAT[:-1] + b', "temperature": 1e400}', 400, "invalid_request", None),
        (GOOD_CHAT.decode().encode("utf-16"), 400, "invalid_request", None),
        (GOOD_CHAT.decode().encode("utf-16-le"), 400, "invalid_request", None),
        (GOOD_CHAT.replace(b"Say", b"\\ud800Say"), 400, "invalid_request", None),
        (GOOD_CHAT.replace(b'"model"', b'"\\udfff": 1, "model"'), 400, "invalid_request", None),
        ({"messages": CHAT}, 400, "invalid_request", "model"),
        ({"model": 5, "messages": CHAT}, 400, "invalid_request", "model"),
        ({"model": "tiny"}, 400, "invalid_request", "messages"),
        ({"model": "tiny", "messages": "hi"}, 400, "invalid_request", "messages"),
        ({"model": "tiny", "messages": [{"content": "x"}]}, 400, "invalid_request", "messages[0]"),
        (
            {"model": "tiny", "messages": CHAT, "max_tokens": 0},
            400,
            "invalid_request",
            "max_tokens",
        ),
        (
            {"model": "tiny", "messages": CHAT, "max_tokens": "9"},
            400,
            "invalid_request",
            "max_tokens",
        ),
        (
            {"model": "tiny", "messages": CHAT, "max_tokens": True},
            400,
            "invalid_request",
            "max_tokens",
        ),
        ({"model": "tiny", "messages": CHAT, "stream": "yes"}, 400, "invalid_request", "stream"),
        ({"model": "../etc/passwd", "messages": CHAT}, 404, "model_not_found", "model"),
    ],
)
def test_bad_chat_requests(gateway: Gateway, body, status, code, param) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = gateway.request("POST", "/v1/chat/completions", raw=raw)
    assert resp.status == status
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert (error["code"], error["param"]) == (code, param)
    assert "Traceback" not in error["message"]
    assert gateway.state()["history"] == []  # nothing bad reaches the supervisor


def test_a_byte_order_mark_is_read_as_the_engine_reads_it(gateway: Gateway) -> None:
    resp = gateway.request("POST", "/v1/chat/completions", raw=b"\xef\xbb\xbf" + GOOD_CHAT)
    assert resp.status == 200 and resp.json()["usage"]["completion_tokens"] == 2


def test_unknown_model_lists_the_available_ones(gateway: Gateway) -> None:
    resp = gateway.post("/v1/completions", {"model": "gpt-9", "prompt": "x"})
    assert resp.status == 404
    assert "tiny, tiny-b, tiny-chat" in resp.json()["error"]["message"]


def test_bad_prompt_types(gateway: Gateway) -> None:
    for prompt in (None, 5, [], [1.5], {"a": 1}):
        resp = gateway.post("/v1/completions", {"model": "tiny", "prompt": prompt})
        assert resp.status == 400 and resp.json()["error"]["param"] == "prompt", prompt


def test_body_too_large_is_413(gateway: Gateway) -> None:
    resp = gateway.post("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "x": "a" * 70000})
    assert resp.status == 413
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_unknown_paths_and_unsupported_endpoints(gateway: Gateway) -> None:
    missing = gateway.request("GET", "/v2/nothing")
    assert missing.status == 404 and missing.json()["error"]["type"] == "not_found_error"
    images = gateway.post("/v1/images/generations", {"model": "tiny", "prompt": "cat"})
    assert images.status == 501 and images.json()["error"]["code"] == "not_implemented"
    embeddings = gateway.post("/v1/embeddings", {"model": "tiny", "input": "x"})
    assert embeddings.status == 400 and "--embeddings" in embeddings.json()["error"]["message"]
    wrong_method = gateway.request("GET", "/v1/chat/completions")
    assert wrong_method.status == 405 and wrong_method.json()["error"]["message"]


def test_engine_errors_pass_through_with_their_status(gateway: Gateway) -> None:
    # Two assistant messages at the end: llama-server refuses it with its own 400.
    messages = [*CHAT, {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]
    resp = gateway.post("/v1/chat/completions", {"model": "tiny", "messages": messages})
    assert resp.status in (400, 500)
    assert "assistant" in resp.json()["error"]["message"]


def slots_busy(url: str) -> bool:
    with urllib.request.urlopen(url + "/slots") as resp:
        return any(s["is_processing"] for s in json.load(resp))


def test_client_disconnect_mid_stream_frees_the_engine_slot(gateway: Gateway) -> None:
    body = json.dumps(
        {"model": "tiny", "messages": CHAT, "max_tokens": 4000, "stream": True, "temperature": 0}
    ).encode()
    port = int(gateway.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert b"200 OK" in sock.recv(4096)
    url = engine_url(gateway)
    wait_until(lambda: slots_busy(url), timeout=5, interval=0.001)
    sock.close()
    closed = time.monotonic()
    wait_until(lambda: not slots_busy(url), timeout=5, interval=0.005)
    assert time.monotonic() - closed < 0.1  # the engine stops generating within 100 ms
    assert gateway.state()["in_flight"] == 0


def resident_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


def test_a_client_that_stops_reading_holds_the_engine_back_not_the_gateways_memory(
    start_gateway, tiny_models
) -> None:
    """The engine streams 20,000 tokens while the client reads nothing for 10 s: the
    gateway stops reading the engine instead of buffering the answer."""
    gw = start_gateway(tiny_model_config(tiny_models, variants=[{"context": 24576}]))
    assert (
        gw.post("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 64}).status == 200
    )
    body = json.dumps(
        {"model": "tiny", "messages": CHAT, "max_tokens": 20000, "ignore_eos": True, "stream": True}
    ).encode()
    sock = socket.create_connection(("127.0.0.1", int(gw.url.rsplit(":", 1)[1])))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    before = resident_bytes(gw.process.pid)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert b"200 OK" in sock.recv(1024)
    most = before
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        most = max(most, resident_bytes(gw.process.pid))
        time.sleep(0.1)
    assert most - before < 2 * 1024 * 1024, (before, most)
    received = b""
    sock.settimeout(60)
    while not received.endswith(b"0\r\n\r\n"):
        data = sock.recv(1 << 20)
        assert data, "the stream ended early"
        received += data
    sock.close()
    assert received.count(b"data: {") > 19000  # every token, once the client read again


def test_an_http_1_0_client_gets_the_stream_without_chunk_framing(gateway: Gateway) -> None:
    """HTTP/1.0 has no chunked encoding (nginx proxies with it by default): the events
    come as they are, up to the close."""
    body = json.dumps({"model": "tiny", "messages": CHAT, "max_tokens": 8, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", int(gateway.url.rsplit(":", 1)[1])), timeout=30)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    answer = b""
    while data := sock.recv(65536):
        answer += data
    sock.close()
    head, _, events = answer.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head
    blocks = [block for block in events.split(b"\n\n") if block]
    assert blocks and all(block.startswith(b"data: ") for block in blocks), events[:300]
    assert blocks[-1] == b"data: [DONE]"


def connections_to(port: int, pid: int) -> set[str]:
    """The TCP states (/proc/net/tcp's hex codes) of `pid`'s connections to 127.0.0.1:`port`."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    states = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[2] == f"0100007F:{port:04X}" and fields[9] in inodes:
            states.add(fields[3])
    return states


ESTABLISHED = "01"


def test_a_spare_connection_waits_at_the_engine_and_one_it_closed_is_not_used(gateway: Gateway) -> None:
    assert gateway.request("POST", "/v1/chat/completions", raw=GOOD_CHAT).status == 200
    port, pid = gateway.engine()["port"], gateway.process.pid
    # Opened ahead for the next request: the gateway holds a connection to the idle engine.
    wait_until(lambda: ESTABLISHED in connections_to(port, pid))
    # llama-server closes a connection that brought no request for 5 s; the gateway lets go.
    wait_until(lambda: ESTABLISHED not in connections_to(port, pid), timeout=10)
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 4, "stream": True}
    resp = gateway.post("/v1/chat/completions", body)
    assert resp.status == 200 and b"data: [DONE]" in resp.body
    assert gateway.state()["counters"].get("requeued", 0) == 0  # not sent on the closed one, then retried
    wait_until(lambda: connections_to(port, pid) == {ESTABLISHED})  # a new one waits
