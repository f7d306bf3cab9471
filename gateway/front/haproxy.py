"""The HAProxy configuration of a front tier that routes requests by their `model`. Pure.

Needs HAProxy 2.4 or later (json_query on the request body); Debian 12 ships 2.6.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from gateway.front.topology import Backend, Gateway, backends, merged_models

ALL_GATEWAYS = "gateways"  # the backend of every gateway: health checks, and what no model routes
HEADROOM = 16 * 1024  # buffer room for a request's headers beside its body
# 96 KiB of body keeps HAProxy's buffers under glibc's mmap threshold (128 KiB); larger
# buffers are mapped afresh for every request: about 1.7 us per KiB of buffer on each
# request's first byte (1 MiB: +1.7 ms).
DEFAULT_MAX_BODY = 96 * 1024
# What HAProxy 2.6 accepts: tune.bufsize below 256 MB with HTTP (it rounds up), timers up
# to 2147483647 ms; a server's maxconn above 2^31 - 1 it reads wrapped around, silently.
MAX_BUFSIZE = 256 * 1024 * 1024 - 16
MAX_BODY = MAX_BUFSIZE - HEADROOM
MAX_TIMEOUT = 2_147_483  # seconds
MAX_MAXCONN = 2**31 - 1
# Health checks: a gateway whose /health stops answering 200 is out after CHECK_FALL
# failures, the first after at most CHECK_INTERVAL, the next CHECK_FAST_INTERVAL apart.
# A check unanswered for CHECK_TIMEOUT fails: a gateway answers /health in milliseconds
# even under load, and a frozen box (SIGSTOP, swapping) accepts connections and never answers.
CHECK_INTERVAL, CHECK_FAST_INTERVAL, CHECK_FALL, CHECK_RISE, CHECK_TIMEOUT = 1.0, 0.25, 2, 2, 1.0
# At most, to see a gateway leave whose checks fail at once (refused, or 503 while it stops)...
NOTICE_SECONDS = CHECK_INTERVAL + CHECK_FAST_INTERVAL * (CHECK_FALL - 1)
# ...and one whose checks go unanswered.
FROZEN_NOTICE_SECONDS = NOTICE_SECONDS + CHECK_TIMEOUT * CHECK_FALL

_PLAIN_WORD = re.compile(r"[A-Za-z0-9._:/@-]+")
_HEADER_NAME = re.compile(r"[0-9A-Za-z_-]+")  # the header names that need no quoting in hdr()


@dataclass(frozen=True)
class FrontSettings:
    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 8080),)
    sticky: str | None = None  # a request header whose value picks the gateway (consistent hashing)
    timeout: int = 600  # seconds a generation may go without a byte (queueing, long answers)
    max_body: int = DEFAULT_MAX_BODY  # bytes of request body HAProxy reads to find the model
    expose_operations: bool = False  # pass /gateway/* and /metrics on to a gateway

    def __post_init__(self) -> None:
        if self.sticky is not None and not is_header_name(self.sticky):
            raise ValueError(f"not a header name: {self.sticky!r}")
        if not 0 < self.timeout <= MAX_TIMEOUT or not 0 < self.max_body <= MAX_BODY:
            raise ValueError(f"timeout or max_body beyond HAProxy's limits: {self}")


def is_header_name(text: str) -> bool:
    return bool(_HEADER_NAME.fullmatch(text))


# Errors HAProxy makes itself, in OpenAI's shape like the gateways' own. Not those about a
# request it cannot parse as HTTP (400, 408 for a head that never ends, 422): HAProxy 2.6
# sends its built-in HTML for them before any http-error applies (haproxy/haproxy#3032).
_ERRORS = {
    400: ("invalid_request_error", "bad_request", "the front (HAProxy) could not read the request"),
    408: ("invalid_request_error", "request_timeout", "the request did not arrive in time"),
    502: ("server_error", "bad_gateway", "the gateway's answer broke off or was unreadable"),
    503: ("server_error", "no_gateway", "no gateway serving this model is up or free; retry later"),
    504: ("server_error", "gateway_timeout", "the gateway did not answer in time"),
}
# Seconds to wait before retrying where that may help: no gateway of the model up or free,
# said as a gateway's own 503 says it.
_RETRY_AFTER = {503: 1}


def openai_error(type_: str, code: str, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def word(text: str) -> str:
    """`text` as one word of HAProxy's configuration: as is when plain, else quoted."""
    if _PLAIN_WORD.fullmatch(text):
        return text
    if "'" not in text and text.isprintable():
        return f"'{text}'"  # strong quoting: nothing inside is interpreted
    escaped = "".join(_weak_escape(c) for c in text)
    return f'"{escaped}"'


def _weak_escape(char: str) -> str:
    if char in '\\"$':
        return "\\" + char
    return char if char.isprintable() else "".join(f"\\x{b:02x}" for b in char.encode())


def json_word(value: Any) -> str:
    """A JSON text as one word; its single quotes escaped in the JSON, so strongly quoted."""
    return word(json.dumps(value).replace("'", "\\u0027"))


def render(gateways: list[Gateway], settings: FrontSettings, command: str = "") -> str:
    """The whole haproxy.cfg: `command` is the line that wrote it, for whoever regenerates."""
    routes = backends(gateways)
    models = merged_models(gateways)
    sections = [
        _header(gateways, command),
        _global(settings, len(json.dumps(models))),
        _defaults(settings),
        _frontend(routes, models, settings),
        _all_gateways(gateways),
        *(_backend(route, settings) for route in routes),
    ]
    return "\n".join(sections)


def _lines(*lines: str) -> str:
    return "".join(f"{line}\n" for line in lines)


def _header(gateways: list[Gateway], command: str) -> str:
    served = [f"#   {g.url} (maxconn {g.maxconn}): {_names(g) or 'no models'}" for g in gateways]
    return _lines(
        "# HAProxy configuration written by `llm-gateway front`: do not edit, write it again",
        "# when the gateways' models change, check it, and reload:",
        f"#   {_printable(command) or 'llm-gateway front --gateway URL ...'} > haproxy.cfg.new",
        "#   haproxy -c -f haproxy.cfg.new && mv haproxy.cfg.new /etc/haproxy/haproxy.cfg",
        "#   systemctl reload haproxy",
        "# Requests go to a gateway that serves the `model` of their JSON body (HAProxy 2.4 or",
        "# later). The gateways check API keys; HAProxy passes them through.",
        "#",
        "# Gateways and the models they serve (aliases in brackets):",
        *served,
    )


def _printable(text: str) -> str:
    """`text` with its control characters escaped: a newline would end the comment."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _names(gateway: Gateway) -> str:
    """tiny (tiny-chat), tiny-b: each name quoted as the config's words are (a comment
    must not end at a newline in a name)."""
    models = dict.fromkeys(s.model for s in gateway.names)
    aliases = {m: [word(s.name) for s in gateway.names if s.model == m and s.name != m] for m in models}
    return ", ".join(word(m) + (f" ({', '.join(aliases[m])})" if aliases[m] else "") for m in models)


def _global(settings: FrontSettings, models_size: int) -> str:
    bufsize = max(settings.max_body, models_size) + HEADROOM  # GET /v1/models' answer fits too
    if bufsize > MAX_BUFSIZE:
        raise ValueError(f"the gateways' models make a list of {models_size} bytes, too large for HAProxy")
    return _lines(
        "global",
        "    log stdout format raw local0 info",
        "    # A request's whole body must fit one buffer for HAProxy to read its model.",
        f"    tune.bufsize {bufsize}",
    )


def _defaults(settings: FrontSettings) -> str:
    timeout = f"{settings.timeout}s"
    check = (
        f"inter {CHECK_INTERVAL:g}s fastinter {CHECK_FAST_INTERVAL * 1000:g}ms "
        f"fall {CHECK_FALL} rise {CHECK_RISE}"
    )
    return _lines(
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        "    option dontlognull",
        "    option forwardfor",
        "    # Requests are buffered (the model is in the body); answers are not: a stream",
        "    # goes out event for event (no `compression`, which would hold it back).",
        "    option http-buffer-request",
        "    # Without it each event of a stream is sent with MSG_MORE and the kernel holds",
        "    # it back until the next one: every token would arrive a token late.",
        "    option http-no-delay",
        "    option abortonclose",
        "    timeout connect 5s",
        "    timeout http-request 60s",
        "    timeout http-keep-alive 60s",
        f"    timeout check {CHECK_TIMEOUT:g}s",
        "    # Generations are long, and wait in the gateway's queue while engines start.",
        f"    timeout client {timeout}",
        f"    timeout server {timeout}",
        f"    timeout tunnel {timeout}",
        f"    timeout queue {timeout}",
        "    # A gateway that refuses the connection or closes it unanswered (it is stopping):",
        "    # the request goes to another gateway of its model.",
        "    retries 2",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response",
        f"    default-server init-addr libc,none {check}",
        *(_http_error(status, openai_error(*error)) for status, error in _ERRORS.items()),
    )


def _http_error(status: int, body: dict[str, Any]) -> str:
    retry = f" hdr Retry-After {_RETRY_AFTER[status]}" if status in _RETRY_AFTER else ""
    return f"    http-error status {status} content-type application/json string {json_word(body)}{retry}"


def _frontend(routes: list[Backend], models: dict[str, Any], settings: FrontSettings) -> str:
    too_large = openai_error(
        "invalid_request_error",
        "request_too_large",
        f"the front reads the model from the first {settings.max_body} bytes of a body "
        "and found none there; send 'model' first or a smaller body",
    )
    return _lines(
        "frontend llm",
        *(f"    bind {_bind(host, port)}" for host, port in settings.listen),
        *(() if settings.expose_operations else _refuse_operations()),
        "    http-request set-var(txn.model) req.body,json_query('$.model') if METH_POST",
        "    http-request set-var(txn.body_size) req.body_size if METH_POST",
        "    acl body_cut req.body_len,sub(txn.body_size) lt 0",
        f"    acl body_cut req.body_len gt {settings.max_body}",
        "    http-request return status 413 content-type application/json string "
        f"{json_word(too_large)} if METH_POST !{{ var(txn.model) -m found }} body_cut",
        "    # GET /v1/models: a gateway checks the key, the answer is every gateway's models.",
        "    http-request set-var(txn.model_list) bool(true) if METH_GET { path /v1/models }",
        "    http-response return status 200 content-type application/json string "
        f"{json_word(models)} if {{ var(txn.model_list) -m bool }} {{ status 200 }}",
        *(line for route in routes for line in _route(route)),
        "    # No model, or one no gateway serves: any gateway answers (400, or 404 in OpenAI's shape).",
        f"    default_backend {ALL_GATEWAYS}",
    )


def _refuse_operations() -> tuple[str, ...]:
    refused = openai_error(
        "permission_error",
        "operations_not_exposed",
        "the front does not pass on operators' endpoints (/gateway/..., /metrics): each would "
        "answer for, or act on, one gateway picked at random; ask each gateway directly",
    )
    return (
        "    # Operators' endpoints (state, logs, load/unload/reload, the dashboard, metrics) would",
        "    # reach one gateway picked at random. Matched decoded: the gateways decode %-escapes.",
        "    http-request return status 403 content-type application/json string "
        f"{json_word(refused)} if {{ path,url_dec -m beg /gateway/ /metrics }}",
    )


def _route(route: Backend) -> list[str]:
    """One acl line per name (lines of one acl name are ORed): a model may have more
    names than HAProxy reads words on a line (64). `--` ends the flags, so a name such
    as `-i` or `-f` is a pattern, not a flag (`-f PATH` would read a pattern file)."""
    return [
        *(f"    acl {route.name} var(txn.model) -m str -- {word(name)}" for name in route.names),
        f"    use_backend {route.name} if {route.name}",
    ]


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _all_gateways(gateways: list[Gateway]) -> str:
    return _lines(
        f"backend {ALL_GATEWAYS}",
        "    # The one health check of each gateway; the model backends follow it.",
        "    balance leastconn",
        "    option httpchk GET /health",
        "    http-check expect status 200",
        *(f"    server {g.server_name} {g.address} check maxconn {g.maxconn}" for g in gateways),
    )


def _backend(route: Backend, settings: FrontSettings) -> str:
    balance = (
        (f"    balance hdr({settings.sticky})", "    hash-type consistent")
        if settings.sticky
        else ("    balance leastconn",)
    )
    return _lines(
        f"backend {route.name}",
        f"    # {', '.join(map(word, route.names))}",
        *balance,
        *(
            f"    server {g.server_name} {g.address} track {ALL_GATEWAYS}/{g.server_name} maxconn {g.maxconn}"
            for g in route.gateways
        ),
    )
