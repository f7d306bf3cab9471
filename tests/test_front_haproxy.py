"""`llm-gateway front` and a real HAProxy in front of stand-in gateways (small HTTP
servers that say who answered): routing of odd model names, bodies too large to route,
the merged model list behind a gateway's key check, HAProxy's own errors in OpenAI's
shape, and gateways that are down when the command runs."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from gateway.demo.harness import free_port
from gateway.front import cli, fetch, haproxy
from gateway.front.haproxy import DEFAULT_MAX_BODY, FROZEN_NOTICE_SECONDS, NOTICE_SECONDS
from tests.conftest import Gateway, Response, wait_until

KEY = "sk-front-test"


@dataclass
class StandIn:
    """A gateway's outline: its models, its key, whether /health says it is up."""

    host: str
    models: list[str]
    key: str | None = None
    up: bool = True
    admin_key: str | None = None  # the one key /gateway/* takes, where set
    listing: bytes | None = None  # its /v1/models answer, instead of one made from `models`
    details: dict[str, Any] = field(default_factory=lambda: {"queue_limit": 8, "shutdown_delay": 2})
    drip: float = 0.0  # seconds between the bytes of its /v1/models answer
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> the model it names
    seen: list[str] = field(default_factory=list)  # "METHOD /path" of each request that arrived
    server: ThreadingHTTPServer = field(init=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.server.server_address[1]}"


def handler_for(gw: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def answer(self, status: int, body: Any) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            if gw.drip and self.path == "/v1/models":
                return self.drip(status, data)
            self.send_response(status)
            for name, value in (("Content-Type", "application/json"), ("Content-Length", str(len(data)))):
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def drip(self, status: int, data: bytes) -> None:
            """The whole answer, head and body, a byte at a time."""
            head = f"HTTP/1.0 {status} OK\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            for byte in head + data:
                try:
                    self.wfile.write(bytes([byte]))
                except OSError:  # the command gave up
                    return
                time.sleep(gw.drip)

        def refused(self) -> bool:
            admin = gw.admin_key and self.path.startswith("/gateway/")
            keys = {gw.admin_key} if admin else {gw.key, gw.admin_key}
            if gw.key and self.headers.get("Authorization") not in {f"Bearer {key}" for key in keys}:
                self.answer(401, {"error": {"message": "invalid API key", "code": "unauthorized"}})
                return True
            return False

        def do_GET(self) -> None:
            gw.seen.append(f"GET {self.path}")
            if self.path == "/health":
                self.answer(200 if gw.up else 503, {"status": "ok" if gw.up else "shutting down"})
            elif self.refused():
                return
            elif self.path == "/v1/models":
                entries = [
                    {
                        "id": m,
                        "object": "model",
                        "context_length": 2048,
                        "meta": {"alias_of": gw.aliases.get(m)},
                    }
                    for m in gw.models
                ]
                self.answer(200, gw.listing or {"object": "list", "data": entries, "from": gw.host})
            elif self.path == "/gateway/models":
                self.answer(200, {"models": [], **gw.details})
            else:
                self.answer(404, {"error": {"message": "no such endpoint"}})

        def do_POST(self) -> None:
            gw.seen.append(f"POST {self.path}")
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.refused():
                return
            model = json.loads(body).get("model")
            said = {"served_by": gw.host, "model": model, "size": len(body)}
            if model in gw.models:
                self.answer(200, said)
            else:
                self.answer(404, {"error": {"message": f"no model {model!r}", "code": "model_not_found"}})

    return Handler


@pytest.fixture
def stand_ins() -> Iterator[Callable[..., StandIn]]:
    running: list[StandIn] = []

    def start(
        host: str,
        *models: str,
        key: str | None = None,
        admin_key: str | None = None,
        aliases: dict[str, str] | None = None,
    ) -> StandIn:
        gw = StandIn(host, list(models), key, admin_key=admin_key, aliases=aliases or {})
        gw.server = ThreadingHTTPServer((host, 0), handler_for(gw))
        # Polled often: shutdown() (a gateway that stops accepting) takes effect at once.
        threading.Thread(target=gw.server.serve_forever, args=(0.02,), daemon=True).start()
        running.append(gw)
        return gw

    yield start
    for gw in running:
        gw.server.shutdown()
        gw.server.server_close()


def front_config(
    capsys: pytest.CaptureFixture[str], gateways: list[StandIn], *options: str
) -> tuple[int, str, str]:
    """Run the command: exit code, the config it wrote, what it said on stderr."""
    argv = [arg for gw in gateways for arg in ("--gateway", gw.url)]
    code = cli.main([*argv, *options])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def front(capsys, stand_ins, start_haproxy) -> Callable[..., Gateway]:
    def start(gateways: list[StandIn], *options: str) -> Gateway:
        port = free_port()
        code, config, err = front_config(capsys, gateways, "--listen", f"127.0.0.1:{port}", *options)
        assert code == 0, err
        return start_haproxy(config, f"http://127.0.0.1:{port}")

    return start


def ask(front: Gateway, model: Any, **extra: Any) -> tuple[int, dict[str, Any]]:
    """A request whose body is UTF-8 as written: HAProxy's json_query reads \\u escapes of
    non-ASCII characters as single bytes, so such names route only when sent as UTF-8."""
    body = json.dumps({"model": model, "messages": [], **extra}, ensure_ascii=False).encode()
    answer = front.request("POST", "/v1/chat/completions", raw=body)
    return answer.status, answer.json()


def test_odd_model_names_reach_the_gateway_serving_them(front, stand_ins) -> None:
    odd = ['it\'s a "model" #1', "модель", "x y", "$HOME"]
    a, b = stand_ins("127.0.0.2", odd[0], odd[1]), stand_ins("127.0.0.3", odd[2], odd[3])
    proxy = front([a, b])
    for model, host in zip(odd, ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"], strict=True):
        status, said = ask(proxy, model)
        assert (status, said["served_by"], said["model"]) == (200, host, model)


def test_names_haproxy_reads_as_flags_route_to_their_gateway_and_no_pattern_file_is_read(
    front, stand_ins, tmp_path
) -> None:
    patterns = tmp_path / "patterns"
    patterns.write_text("secret\n")
    a = stand_ins("127.0.0.2", "-i", "--", "-m", "if")
    # `-f` first, then its alias: written as patterns, `-f PATH` would read the file.
    b = stand_ins("127.0.0.3", "-f", str(patterns), "}", "-n", aliases={str(patterns): "-f"})
    proxy = front([a, b])
    for gw in (a, b):
        for model in gw.models:
            status, said = ask(proxy, model)
            assert (status, said["served_by"], said["model"]) == (200, gw.host, model)
    answer = proxy.request("POST", "/v1/chat/completions?probe=secret", {"model": "secret", "messages": []})
    assert answer.status == 404
    # HAProxy's log names the backend: the one of every gateway, not model_-f's.
    logged = wait_until(lambda: [line for line in proxy.log().splitlines() if "probe=secret" in line])
    assert " llm gateways/" in logged[0], logged


def test_an_unknown_model_gets_a_gateways_own_404(front, stand_ins) -> None:
    proxy = front([stand_ins("127.0.0.2", "tiny")])
    status, said = ask(proxy, "nope")
    assert status == 404 and said["error"]["code"] == "model_not_found"


# Operators' endpoints, also as the gateways read them once %-escapes are decoded.
OPERATIONS = [
    "GET /gateway/state",
    "GET /gateway/models",
    "GET /gateway/logs",
    "GET /gateway/events",
    "GET /gateway/ui",
    "GET /metrics",
    "POST /gateway/load",
    "POST /gateway/unload",
    "POST /gateway/reload",
    "GET /%67ateway/state",
    "GET /%6detrics",
    "GET /metrics?name=x",
]


def operate(front: Gateway, request: str) -> Response:
    method, path = request.split()
    return front.request(method, path, raw=b"{}" if method == "POST" else None)


def test_operators_endpoints_are_refused_by_the_front(front, stand_ins) -> None:
    gw = stand_ins("127.0.0.2", "tiny")
    proxy = front([gw])
    gw.seen.clear()  # what the command asked
    for request in OPERATIONS:
        answer = operate(proxy, request)
        assert answer.status == 403, request
        error = answer.json()["error"]
        assert sorted(error) == ["code", "message", "param", "type"]
        assert (error["type"], error["code"]) == ("permission_error", "operations_not_exposed")
    assert not [seen for seen in gw.seen if "/health" not in seen]
    assert ask(proxy, "tiny")[0] == 200 and proxy.request("GET", "/v1/models").status == 200


def test_expose_operations_lets_them_through(front, stand_ins) -> None:
    gw = stand_ins("127.0.0.2", "tiny")
    proxy = front([gw], "--expose-operations")
    gw.seen.clear()
    assert operate(proxy, "GET /gateway/models").status == 200
    for request in OPERATIONS:
        operate(proxy, request)
    assert [seen for seen in gw.seen if "/health" not in seen] == [OPERATIONS[1], *OPERATIONS]


def model_last(size: int, model: str) -> bytes:
    """A chat body of `size` bytes whose model comes last, as the OpenAI Python SDK orders it."""
    body = {"messages": [{"role": "user", "content": ""}], "model": model}
    padding = size - len(json.dumps(body))
    body["messages"][0]["content"] = "x" * padding
    return json.dumps(body).encode()


@pytest.mark.parametrize("max_body", [DEFAULT_MAX_BODY, 4096])
def test_a_body_of_max_body_bytes_is_routed_wherever_its_model_is(front, stand_ins, max_body) -> None:
    options = () if max_body == DEFAULT_MAX_BODY else ("--max-body", str(max_body))
    proxy = front([stand_ins("127.0.0.2", "tiny"), stand_ins("127.0.0.3", "tiny-b")], *options)
    answer = proxy.request("POST", "/v1/chat/completions", raw=model_last(max_body, "tiny-b"))
    assert answer.status == 200 and answer.json() == {
        "served_by": "127.0.0.3",
        "model": "tiny-b",
        "size": max_body,
    }


def test_a_body_too_large_to_find_its_model_gets_413_and_one_with_the_model_first_is_routed(
    front, stand_ins
) -> None:
    proxy = front([stand_ins("127.0.0.2", "tiny"), stand_ins("127.0.0.3", "tiny-b")], "--max-body", "4096")
    raw = model_last(200_000, "tiny-b")  # beyond HAProxy's buffer
    refused = proxy.request("POST", "/v1/chat/completions", raw=raw)
    assert refused.status == 413 and refused.json()["error"]["code"] == "request_too_large"
    messages = json.loads(raw)["messages"]
    status, said = ask(proxy, "tiny-b", messages=messages)  # "model" first
    assert (status, said["served_by"], said["size"]) == (200, "127.0.0.3", len(raw))


def test_the_model_list_is_the_union_once_a_gateway_let_the_key_in(front, stand_ins, monkeypatch) -> None:
    monkeypatch.setenv("FRONT_KEY", KEY)
    a = stand_ins("127.0.0.2", "tiny", "shared", key=KEY)
    b = stand_ins("127.0.0.3", "shared", "tiny-b", key=KEY)
    proxy = front([a, b], "--api-key-env", "FRONT_KEY")
    assert proxy.request("GET", "/v1/models").status == 401  # a gateway checked the key
    listed = proxy.request("GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert listed.status == 200
    assert [m["id"] for m in listed.json()["data"]] == ["tiny", "shared", "tiny-b"]


def test_a_model_whose_gateways_are_down_gets_haproxys_503_in_openai_shape(front, stand_ins) -> None:
    a, b = stand_ins("127.0.0.2", "tiny"), stand_ins("127.0.0.3", "tiny-b")
    proxy = front([a, b])
    b.up = False
    body = json.dumps({"model": "tiny-b", "messages": []}).encode()
    refused = wait_until(
        lambda: (r := proxy.request("POST", "/v1/chat/completions", raw=body)).status == 503 and r
    )
    said = refused.json()
    assert said["error"]["code"] == "no_gateway" and said["error"]["type"] == "server_error"
    assert refused.headers["retry-after"] == "1"  # as a gateway's own 503 says
    assert ask(proxy, "tiny")[0] == 200


def seconds_to_down(front: Gateway, gw: StandIn, stop: Callable[[], object]) -> float:
    """From `stop` to HAProxy's log saying the gateway is out."""
    down = f"Server gateways/{gw.url.removeprefix('http://')} is DOWN"
    started = time.monotonic()
    stop()
    wait_until(lambda: down in front.log(), timeout=30, interval=0.005)
    return time.monotonic() - started


def test_a_gateway_that_refuses_or_freezes_is_out_within_the_documented_time(front, stand_ins) -> None:
    refusing, frozen = stand_ins("127.0.0.2", "tiny"), stand_ins("127.0.0.3", "tiny-b")
    proxy = front([refusing, frozen])
    refused = seconds_to_down(
        proxy, refusing, lambda: (refusing.server.shutdown(), refusing.server.server_close())
    )
    # Listening, never accepting: what HAProxy sees of a process stopped by SIGSTOP.
    froze = seconds_to_down(proxy, frozen, frozen.server.shutdown)
    print(f"out after: refused {refused:.2f} s, frozen {froze:.2f} s")
    slack = 0.3  # HAProxy's timers and this test's polling on a loaded machine
    assert refused < NOTICE_SECONDS + slack and froze < FROZEN_NOTICE_SECONDS + slack


def test_a_gateway_down_when_the_command_runs_is_reported_and_nothing_written(capsys, stand_ins) -> None:
    up = stand_ins("127.0.0.2", "tiny")
    down = StandIn("127.0.0.3", [])
    down.server = ThreadingHTTPServer(("127.0.0.3", 0), handler_for(down))
    down.server.server_close()  # its port: nobody listens there now
    code, config, err = front_config(capsys, [up, down])
    assert code == 1 and config == ""
    assert f"{down.url}: GET /v1/models failed" in err and "no config written" in err
    code, config, err = front_config(capsys, [up, down], "--allow-missing")
    assert code == 0 and f"server {up.url.removeprefix('http://')} " in config
    assert f"server {down.url.removeprefix('http://')} " not in config
    assert "1 gateways left out" in err


def test_a_model_list_larger_than_haproxy_holds_writes_no_config(capsys, stand_ins, monkeypatch) -> None:
    # Instead of listing 256 MB of models: HAProxy's buffers held only the default body.
    monkeypatch.setattr(haproxy, "MAX_BUFSIZE", DEFAULT_MAX_BODY + haproxy.HEADROOM)
    many = stand_ins("127.0.0.2", *(f"model-{i}" for i in range(2000)))
    code, config, err = front_config(capsys, [many])
    assert code == 1 and config == ""
    assert "models make a list of 184918 bytes, too large for HAProxy: no config written" in err


@pytest.mark.parametrize(
    ("listing", "details"),
    [
        (b'{"data": [{"id": "x", "meta": "str"}]}', None),
        (b'{"data": [{"id": "x", "meta": {"alias_of": 5}}]}', None),
        (b'{"data": [{"id": "x", "meta": {"alias_of": ""}}]}', None),
        (b'{"data": [{"id": ""}]}', None),
        (b'{"data": [{"id": 5}]}', None),
        (b'{"data": [null]}', None),
        (b'{"data": {"id": "x"}}', None),
        (b'{"data": [{"id": "x", "context_length": NaN}]}', None),
        (b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
        (b"[]", None),
        (b"\xff", None),
        (None, {"queue_limit": True}),
        (None, {"queue_limit": 2**31}),
        (None, {"queue_limit": 8.5}),
    ],
)
def test_a_malformed_answer_is_that_gateways_problem(capsys, stand_ins, listing, details) -> None:
    good, bad = stand_ins("127.0.0.2", "tiny"), stand_ins("127.0.0.3", "tiny-b")
    bad.listing, bad.details = listing, details or bad.details
    code, config, err = front_config(capsys, [good, bad])
    assert code == 1 and config == "" and err.startswith(f"llm-gateway front: {bad.url}: ")
    assert "1 of 2 gateways did not answer: no config written" in err
    code, config, err = front_config(capsys, [good, bad], "--allow-missing")
    assert code == 0 and f"{good.url} (maxconn 8)" in config and "1 gateways left out" in err


def test_a_gateway_that_answers_a_byte_at_a_time_is_given_up_on_at_the_deadline(
    capsys, stand_ins, monkeypatch
) -> None:
    monkeypatch.setattr(fetch, "FETCH_TIMEOUT", 1.0)
    good, slow = stand_ins("127.0.0.2", "tiny"), stand_ins("127.0.0.3", "tiny-b")
    slow.drip = 0.05  # each read gets a byte well within the deadline: about 12 s in all
    started = time.monotonic()
    code, config, err = front_config(capsys, [good, slow], "--allow-missing")
    assert time.monotonic() - started < 2.5
    assert code == 0 and f"{slow.url}: no complete answer within 1 s" in err
    assert f"{good.url} (maxconn 8)" in config and f"{slow.url} (maxconn" not in config


def test_a_gateway_that_refuses_the_key_is_reported(capsys, stand_ins, monkeypatch) -> None:
    locked = stand_ins("127.0.0.2", "tiny", key=KEY)
    code, config, err = front_config(capsys, [locked])
    assert code == 1 and config == "" and "answered 401 Unauthorized (give a key with --api-key-env)" in err
    monkeypatch.setenv("FRONT_KEY", "sk-wrong")
    code, config, err = front_config(capsys, [locked], "--api-key-env", "FRONT_KEY")
    assert code == 1 and "answered 401 Unauthorized (it refused the key from --api-key-env)" in err


def test_a_key_that_is_not_the_admin_key_is_told_what_would_do(capsys, stand_ins, monkeypatch) -> None:
    monkeypatch.setenv("FRONT_KEY", KEY)
    locked = stand_ins("127.0.0.2", "tiny", key=KEY, admin_key="sk-admin")
    code, config, err = front_config(capsys, [locked], "--api-key-env", "FRONT_KEY")
    assert code == 1 and config == ""
    assert (
        "GET /gateway/models answered 401 Unauthorized (it needs the admin key in --api-key-env, "
        "or give --maxconn)" in err
    )
    code, config, err = front_config(capsys, [locked], "--api-key-env", "FRONT_KEY", "--maxconn", "8")
    assert code == 0 and "maxconn 8" in config
