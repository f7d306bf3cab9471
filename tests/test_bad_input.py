"""Hostile and broken requests against one real gateway: each gets the right 4xx, quickly,
and the gateway stays healthy.

The table covers bodies that are not UTF-8 or not JSON, JSON nested 100000 deep, numbers
no integer holds, a wrong type for every field the gateway reads, model names with path
characters, empty and `null` bodies, bodies and headers over the limits. A module fixture
sends the whole table once; each case's test checks its answer, and the checks of the
gateway after the table depend on that fixture, so they hold also when run alone.
Separate tests hold a slow-loris body open while other requests must go on.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.demo.harness import free_port, lua_config, spawn_gateway, wait_healthy
from tests.conftest import Gateway, alive, tiny_model_config, wait_until

QUICK = 2.0  # seconds any of these may take
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
MESSAGE = {"role": "user", "content": "hi"}
DROP = object()  # a field left out
MAX_BODY = 8 * 1024 * 1024  # the default max_body_bytes
# NaN, Infinity and numbers no float holds: JSON the engine refuses, refused as the body's fault
NOT_JSON = "the request body is not valid JSON"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, llama_server, tiny_models) -> Iterator[Gateway]:
    """One gateway (default server options) for the whole table."""
    folder = tmp_path_factory.mktemp("bad-input")
    port = free_port()
    config = folder / "gateway.cfg.lua"
    config.write_text(lua_config(port, tiny_model_config(tiny_models)))
    log_path = folder / "gateway.log"
    gw = Gateway(f"http://127.0.0.1:{port}", spawn_gateway(config, log_path), config, log_path)
    try:
        wait_healthy(gw.url, gw.process)
    except RuntimeError as exc:
        gw.stop()
        raise AssertionError(f"{exc}:\n{gw.log()}") from None
    yield gw
    if gw.process.poll() is None:
        pid = gw.state().get("pid")
        code = gw.stop()
        assert code == 0, f"gateway exit code {code}:\n{gw.log()[-3000:]}"
        if pid:
            wait_until(lambda: not alive(pid), timeout=5)


# --- the table ------------------------------------------------------------------------------------


def chat(message: Any = MESSAGE, **fields: Any) -> bytes:
    """A chat body with `fields` changed (DROP leaves one out); `message` is messages[0]."""
    body = {"model": "tiny", "messages": [message], "max_tokens": 2, **fields}
    return json.dumps({k: v for k, v in body.items() if v is not DROP}).encode()


def msg(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in {**MESSAGE, **fields}.items() if v is not DROP}


def completion(**fields: Any) -> bytes:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, **fields}
    return json.dumps({k: v for k, v in body.items() if v is not DROP}).encode()


def literal(body: bytes, name: str, text: str) -> bytes:
    """`body` with the value of `name` replaced by raw JSON text (numbers JSON cannot spell)."""
    marker = b'"@@' + name.encode() + b'@@"'
    assert marker in body
    return body.replace(marker, text.encode())


def with_literal(name: str, text: str, maker=chat) -> bytes:
    return literal(maker(**{name: f"@@{name}@@"}), name, text)


@dataclass
class Case:
    id: str
    body: bytes
    expect: frozenset[int] = frozenset({400})
    param: str | None = None  # when the gateway itself must name the field
    says: str | None = None  # what the gateway's own error message must say
    path: str = CHAT_PATH
    headers: dict[str, str] = field(default_factory=dict)


def case(id: str, body: bytes, expect: int | set[int] = 400, **kw: Any) -> Any:
    statuses = frozenset({expect} if isinstance(expect, int) else expect)
    return pytest.param(Case(id, body, statuses, **kw), id=id)


WRONG_TYPES: dict[str, list[Any]] = {
    "model": [5, 1.5, True, None, [], {}, "", ["tiny"], DROP],
    "messages": ["hi", 5, None, {}, [], True, {"role": "user", "content": "hi"}, DROP],
    "max_tokens": ["5", 1.5, 2.0, True, [], {}, 0, -1, -(10**30)],
    "max_completion_tokens": ["5", 1.5, True, 0, -1],
    "stream": ["true", 1, 0, [], {}],
    "n": ["2", 1.5, True, 0, -1, []],
}
MESSAGE_TYPES: list[tuple[str, Any, str]] = [
    *((f"messages[0]={v!r}", v, "messages[0]") for v in ("hi", 5, None, [], True)),
    *((f"role={v!r}", msg(role=v), "messages[0]") for v in (5, None, [], {}, True, DROP)),
    *((f"content={v!r}", msg(content=v), "messages[0].content") for v in (5, 1.5, True, {})),
]
CONTENT_PARTS = [
    [5],
    [None],
    ["hi"],
    [{"type": "text", "text": 5}],
    [{"type": "text", "text": None}],
    [{"type": "text"}],
]
PROMPTS = [5, None, True, {}, [], [[]], [1.5], [True], ["a", 5], [[1, "a"]], DROP]
# Fields the gateway reads to size a chat prompt (it measures them as JSON).
SIZED_EXTRAS = [
    ("tools=5", chat(tools=5)),
    ("tools='x'", chat(tools="x")),
    ("tools=[5]", chat(tools=[5])),
    ("tools={'a': 1}", chat(tools={"a": 1})),
    ("tool_calls='x'", chat(msg(role="assistant", tool_calls="x"))),
    ("name=5", chat(msg(name=5))),
]
MODEL_NAMES = ["../../etc/passwd", "tiny/../tiny", "tiny\x00", "\x00", "/etc/passwd", "..", "tiny\n", "TINY"]
NESTED = 100_000

TABLE = [
    # not UTF-8, not JSON, not an object
    case("invalid-utf8-content", b'{"model":"tiny","messages":[{"role":"user","content":"\xff\xfe"}]}'),
    case("invalid-utf8-model", b'{"model":"ti\xc3\x28ny","messages":[{"role":"user","content":"hi"}]}'),
    case("utf8-overlong-slash", b'{"model":"tiny\xc0\xafx","messages":[{"role":"user","content":"hi"}]}'),
    case("nested-arrays-100000", b"[" * NESTED),
    case("nested-arrays-100000-closed", b"[" * NESTED + b"]" * NESTED),
    case("nested-objects-100000", b'{"a":' * NESTED + b"1" + b"}" * NESTED),
    case("nested-in-messages", b'{"model":"tiny","messages":' + b"[" * NESTED + b"]" * NESTED + b"}"),
    case("nested-in-content", chat(msg(content="@@c@@")).replace(b'"@@c@@"', b"[" * NESTED + b"]" * NESTED)),
    case("empty-body", b""),
    case("whitespace-body", b" \r\n\t "),
    case("json-null", b"null"),
    case("json-array", b"[]"),
    case("json-string", b'"tiny"'),
    case("json-number", b"5"),
    case("truncated-json", chat()[:-7]),
    case("trailing-garbage", chat() + b"}"),
    case("nul-byte-json", b"\x00" + chat()),
    # numbers
    case("max_tokens=1e400", with_literal("max_tokens", "1e400"), says=NOT_JSON),
    case("max_tokens=-1e400", with_literal("max_tokens", "-1e400"), says=NOT_JSON),
    case("max_tokens=10**30", chat(max_tokens=10**30)),
    case("max_tokens=1e30", with_literal("max_tokens", "1e30"), param="max_tokens"),
    case("max_tokens=5000-digits", with_literal("max_tokens", "9" * 5000)),
    case("max_tokens=NaN", with_literal("max_tokens", "NaN"), says=NOT_JSON),
    case("max_tokens=Infinity", with_literal("max_tokens", "Infinity"), says=NOT_JSON),
    case("max_completion_tokens=10**30", chat(max_completion_tokens=10**30)),
    case("max_completion_tokens=1e400", with_literal("max_completion_tokens", "1e400"), says=NOT_JSON),
    case("completions-max_tokens=10**30", completion(max_tokens=10**30), path=COMPLETIONS_PATH),
    case("n=10**30", chat(n=10**30)),
    case("n=1e400", with_literal("n", "1e400"), says=NOT_JSON),
    case("prompt-token=10**30", completion(prompt=[10**30]), path=COMPLETIONS_PATH),
    # wrong types
    *(
        case(
            f"{name}={value!r}" if value is not DROP else f"{name}-missing", chat(**{name: value}), param=name
        )
        for name, values in WRONG_TYPES.items()
        for value in values
    ),
    *(case(id, chat(message), param=param) for id, message, param in MESSAGE_TYPES),
    *(case(f"content-parts={parts!r}", chat(msg(content=parts))) for parts in CONTENT_PARTS),
    *(
        case(
            f"prompt={value!r}" if value is not DROP else "prompt-missing",
            completion(prompt=value),
            param="prompt",
            path=COMPLETIONS_PATH,
        )
        for value in PROMPTS
    ),
    case("completions-max_tokens='5'", completion(max_tokens="5"), param="max_tokens", path=COMPLETIONS_PATH),
    case("completions-stream=1", completion(stream=1), param="stream", path=COMPLETIONS_PATH),
    case("completions-model=5", completion(model=5), param="model", path=COMPLETIONS_PATH),
    *(case(id, body) for id, body in SIZED_EXTRAS),
    # model names with path characters: just unknown names
    *(case(f"model={name!r}", chat(model=name), 404, param="model") for name in MODEL_NAMES),
    case("completions-model=../", completion(model="../tiny"), 404, param="model", path=COMPLETIONS_PATH),
    # sizes
    case("body-10MB", chat(msg(content="a" * 10_000_000)), 413),
    case("header-100KB", chat(), {400, 431}, headers={"X-Big": "a" * 100_000}),
]


def exchange(gateway: Gateway, case: Case) -> tuple[int, bytes]:
    """POST the case's bytes as they are; a server that answers early (413) may cut the upload."""
    port = int(gateway.url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the answer may be there
            conn.request(
                "POST",
                case.path,
                body=case.body,
                headers={"Content-Type": "application/json", **case.headers},
            )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def error_of(body: bytes) -> dict[str, Any]:
    payload = json.loads(body)
    assert isinstance(payload, dict) and isinstance(payload.get("error"), dict), payload
    error = payload["error"]
    assert isinstance(error.get("message"), str) and error["message"], payload
    return error


@dataclass
class Answer:
    status: int
    body: bytes
    seconds: float
    gateway_alive: bool  # after this case


@pytest.fixture(scope="module")
def table(gateway: Gateway) -> dict[str, Answer | Exception]:
    """Every case of the table sent once, in order, to the module's gateway; the answer
    or the error of each. The checks after the table use this fixture, so the table has
    run before them also when they run alone."""
    answers: dict[str, Answer | Exception] = {}
    for param in TABLE:
        (case,) = param.values
        assert isinstance(case, Case) and case.id not in answers, f"two cases named {case.id}"
        started = time.monotonic()
        try:
            status, body = exchange(gateway, case)
        except Exception as exc:  # reported by the case's own test
            answers[case.id] = exc
        else:
            alive = gateway.process.poll() is None
            answers[case.id] = Answer(status, body, time.monotonic() - started, alive)
    return answers


@pytest.mark.parametrize("case", TABLE)
def test_hostile_request_gets_a_quick_4xx(table: dict[str, Answer | Exception], case: Case) -> None:
    answer = table[case.id]
    if isinstance(answer, Exception):
        raise AssertionError(f"{case.id}: no answer: {answer!r}") from answer
    status, body = answer.status, answer.body
    assert answer.gateway_alive, f"the gateway died on {case.id}"
    assert status in case.expect, f"{case.id}: HTTP {status} (expected {sorted(case.expect)}): {body[:500]!r}"
    assert answer.seconds < QUICK, f"{case.id}: took {answer.seconds:.2f}s"
    if case.id.startswith("header-"):
        return  # refused by the HTTP parser, before any handler: plain text is fine
    error = error_of(body)
    if case.param is not None or case.says is not None:  # the gateway's own check: its full OpenAI shape
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["param"] == case.param, error
        assert error["type"] == "invalid_request_error", error
        assert case.says is None or case.says in error["message"], error
    if 404 in case.expect:
        assert error["code"] == "model_not_found", error


def test_ten_megabytes_chunked_are_refused_with_413(gateway: Gateway) -> None:
    """No Content-Length to refuse up front: the limit must hold while reading."""
    port = int(gateway.url.rsplit(":", 1)[1])
    piece = b"a" * (1024 * 1024)
    body = chat(msg(content="@@c@@")).split(b'"@@c@@"')

    def chunks() -> Iterator[bytes]:
        yield body[0] + b'"'
        for _ in range(10):
            yield piece
        yield b'"' + body[1]

    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.request(
                "POST",
                CHAT_PATH,
                body=chunks(),
                headers={"Content-Type": "application/json"},
                encode_chunked=True,
            )
        resp = conn.getresponse()
        status, answer = resp.status, resp.read()
    finally:
        conn.close()
    assert status == 413, answer[:300]
    assert time.monotonic() - started < QUICK
    assert "too large" in error_of(answer)["message"]


def test_slow_loris_bodies_do_not_block_other_requests(gateway: Gateway) -> None:
    """Connections that announce 1000 bytes and send a few, slowly, hold up nobody."""
    port = int(gateway.url.rsplit(":", 1)[1])
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    slow = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
    try:
        for s in slow:
            s.sendall(head + b'{"mo')
        for byte in b'del": "ti':
            for s in slow:
                s.sendall(bytes([byte]))
            time.sleep(0.05)
            started = time.monotonic()
            assert gateway.request("GET", "/health", timeout=QUICK).status == 200
            answer = gateway.post(
                CHAT_PATH, {"model": "tiny", "messages": [MESSAGE], "max_tokens": 2}, timeout=10
            )
            assert answer.status == 200, answer.body[:300]
            assert time.monotonic() - started < QUICK
        state = gateway.state()
        assert state["in_flight"] == 0 and state["queued"]["count"] == 0  # never reached the queue
    finally:
        for s in slow:
            s.close()
    assert gateway.request("GET", "/health", timeout=QUICK).status == 200


def test_null_content_is_counted_with_its_template(gateway: Gateway) -> None:
    """Content null carries no text, but the template still renders tokens: they count.

    19 template tokens + 505 reserved do not fit 512; a 512 engine would cut the answer.
    """
    assert gateway.post(CHAT_PATH, {"model": "tiny-b", "messages": [MESSAGE], "max_tokens": 2}).status == 200
    answer = gateway.post(
        CHAT_PATH,
        {"model": "tiny", "messages": [{"role": "user", "content": None}], "max_tokens": 505},
    )
    assert answer.status == 200, answer.body[:300]
    usage = answer.json()["usage"]
    assert usage["completion_tokens"] == 505, (answer.headers.get("X-Gateway-Context"), usage)


@pytest.mark.usefixtures("table")
def test_the_gateway_is_healthy_after_the_table(gateway: Gateway) -> None:
    assert gateway.process.poll() is None
    assert gateway.request("GET", "/health", timeout=QUICK).status == 200
    for model in ("tiny", "tiny-chat", "tiny-b"):
        answer = gateway.post(CHAT_PATH, {"model": model, "messages": [MESSAGE], "max_tokens": 3}, timeout=30)
        assert answer.status == 200, answer.body[:300]
        assert answer.json()["choices"][0]["message"]["content"]
    streamed = gateway.post(
        CHAT_PATH, {"model": "tiny", "messages": [MESSAGE], "max_tokens": 3, "stream": True}, timeout=30
    )
    assert streamed.status == 200 and streamed.body.rstrip().endswith(b"data: [DONE]")
    state = gateway.state()
    assert state["in_flight"] == 0 and state["queued"]["count"] == 0


@pytest.mark.usefixtures("table")
def test_no_tracebacks_in_the_log_after_the_table(gateway: Gateway) -> None:
    """Hostile clients are refused, not logged as the gateway's own errors."""
    log = gateway.log()
    for needle in ("Traceback", "unexpected error", "Error handling request"):
        at = log.find(needle)
        assert at < 0, log[max(0, at - 300) : at + 1500]


def test_a_malformed_header_never_puts_a_key_in_the_log(start_gateway, tiny_models) -> None:
    """aiohttp's message for a header it cannot parse quotes the raw bytes: the log, the
    dashboard's live log and /gateway/logs must not carry an API key that way."""
    gw = start_gateway(tiny_model_config(tiny_models), api_keys=["KEY-ALICE-111"])
    port = int(gw.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer KEY-ALICE-111 \x01\r\n\r\n"
        )
        assert b" 400 " in sock.recv(4096).split(b"\r\n", 1)[0]  # (its own key comes back to it alone)
    wait_until(lambda: "bad HTTP request" in gw.log())
    assert "KEY-ALICE-111" not in gw.log()
