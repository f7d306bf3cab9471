"""llm-gateway front: write an HAProxy configuration for several gateways to stdout."""

from __future__ import annotations

import argparse
import ipaddress
import os
import shlex
import sys
from collections.abc import Callable

from gateway.front.fetch import gateway_address, read_all
from gateway.front.haproxy import (
    MAX_BODY,
    MAX_MAXCONN,
    MAX_TIMEOUT,
    NOTICE_SECONDS,
    FrontSettings,
    is_header_name,
    render,
)
from gateway.front.topology import Backend, Gateway, backends, contexts

EXIT_OK = 0
EXIT_NO_CONFIG = 1  # a gateway did not answer, or no config HAProxy accepts could be written


def listen_address(text: str) -> tuple[str, int]:
    """ip:port, [ipv6]:port, or :port (every IPv4 address)."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        if host:
            ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        number = 0
    if not sep or not 0 < number < 65536 or "%" in host:  # HAProxy reads no IPv6 zone
        raise argparse.ArgumentTypeError(f"not ip:port, [ipv6]:port or :port: {text!r}")
    return host, number


def whole_number(largest: int) -> Callable[[str], int]:
    """A parser of whole numbers from 1 to `largest` (what HAProxy accepts)."""

    def parse(text: str) -> int:
        value = int(text) if text.isdigit() else 0
        if not 0 < value <= largest:
            raise argparse.ArgumentTypeError(f"not a whole number from 1 to {largest}: {text!r}")
        return value

    return parse


def header_name(text: str) -> str:
    if not is_header_name(text):
        raise argparse.ArgumentTypeError(f"not a header name: {text!r}")
    return text


def gateway_url(text: str) -> str:
    try:
        gateway_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.rstrip("/")


def parse_args(argv: list[str]) -> argparse.Namespace:
    defaults = FrontSettings()
    parser = argparse.ArgumentParser(
        prog="llm-gateway front",
        description="Write to stdout an HAProxy configuration (HAProxy 2.4 or later) that routes "
        "each request to a gateway serving its model, from the gateways' own /v1/models.",
    )
    parser.add_argument(
        "--gateway",
        action="append",
        required=True,
        type=gateway_url,
        metavar="URL",
        help="a gateway's base URL, http://host:port (once per gateway)",
    )
    parser.add_argument(
        "--listen",
        action="append",
        type=listen_address,
        metavar="ADDR",
        help="where HAProxy listens: ip:port, [ipv6]:port or :port (repeatable; default 127.0.0.1:8080)",
    )
    parser.add_argument(
        "--sticky",
        type=header_name,
        metavar="HEADER",
        help="hash this request header (e.g. X-Session-Id) to pick among the gateways "
        "of a model, so a conversation stays where its prompt is cached; "
        "default: the least busy gateway",
    )
    parser.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="the environment variable holding a key for the gateways "
        "(the admin key where /gateway/* needs it)",
    )
    parser.add_argument(
        "--maxconn",
        type=whole_number(MAX_MAXCONN),
        metavar="N",
        help="connections at once to each gateway per model (default: each gateway's queue_limit)",
    )
    parser.add_argument(
        "--timeout",
        type=whole_number(MAX_TIMEOUT),
        default=defaults.timeout,
        metavar="SECONDS",
        help=f"how long an answer may go without a byte (default {defaults.timeout})",
    )
    parser.add_argument(
        "--max-body",
        type=whole_number(MAX_BODY),
        default=defaults.max_body,
        metavar="BYTES",
        help="the request body HAProxy buffers to read its model; a larger body whose model "
        f"comes after it gets 413 (default {defaults.max_body}; more costs every request's "
        "first byte about 1.7 us per KiB over 112 KiB)",
    )
    parser.add_argument(
        "--expose-operations",
        action="store_true",
        help="pass /gateway/* (state, logs, load, unload, reload, the dashboard) and /metrics "
        "on to a gateway; by default the front answers them 403, as each would reach one "
        "gateway picked at random",
    )
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="leave out gateways that do not answer (reported) instead of failing",
    )
    args = parser.parse_args(argv)
    addresses = [gateway_address(url) for url in args.gateway]
    if len(set(addresses)) < len(addresses):
        parser.error("a gateway is given twice")
    if args.api_key_env:
        problem = key_problem(os.environ.get(args.api_key_env))
        if problem:
            parser.error(f"--api-key-env: the environment variable {args.api_key_env} {problem}")
    return args


def key_problem(key: str | None) -> str | None:
    """Why `key` (an environment variable's value) cannot be sent as a key, if it cannot."""
    if key is None:
        return "is not set"
    if not key:
        return "is empty"  # not "no key": the gateways would refuse every call, unexplained
    if not key.isascii() or not key.isprintable():
        return "holds characters an HTTP header cannot carry"
    return None


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    key = os.environ[args.api_key_env] if args.api_key_env else None
    found, failures = read_all(args.gateway, key, args.maxconn)
    for failure in failures:
        say(str(failure))
    if failures and (not args.allow_missing or not found):
        none = "" if found else " (none answered)"
        say(f"{len(failures)} of {len(args.gateway)} gateways did not answer{none}: no config written")
        say("--allow-missing leaves out the gateways that do not answer")
        return EXIT_NO_CONFIG
    listen = tuple(args.listen or FrontSettings().listen)
    settings = FrontSettings(listen, args.sticky, args.timeout, args.max_body, args.expose_operations)
    try:
        config = render(found, settings, shlex.join(["llm-gateway", "front", *argv]))
    except ValueError as exc:
        say(f"{exc}: no config written")
        return EXIT_NO_CONFIG
    sys.stdout.write(config)
    routes = backends(found)
    shared = sum(len(r.gateways) > 1 for r in routes)
    left_out = f"; {len(failures)} gateways left out" if failures else ""
    say(f"{len(found)} gateways, {len(routes)} model backends ({shared} on several gateways){left_out}")
    for note in notes(found):
        say(note)
    return EXIT_OK


def notes(gateways: list[Gateway]) -> list[str]:
    """What will not work as well as it could with these gateways."""
    found = [
        f"the model name {name!r} is not ASCII: HAProxy routes requests for it only when their "
        "JSON holds it as UTF-8, not as \\u escapes"
        for name in sorted({s.name for g in gateways for s in g.names if not s.name.isascii()})
    ]
    found += [note for route in backends(gateways) if (note := _contexts_differ(route))]
    found += [
        f"{g.url} has shutdown_delay {g.shutdown_delay:g}s; HAProxy needs up to {NOTICE_SECONDS:g}s "
        "to see it leave (requests it refuses meanwhile go to another gateway of their model, if any)"
        for g in gateways
        if g.shutdown_delay is not None and g.shutdown_delay < NOTICE_SECONDS
    ]
    return found


def _contexts_differ(route: Backend) -> str | None:
    """A model whose gateways have different largest contexts: HAProxy balances without
    reading the prompt, so a long one fails on some of them (not an error: it may be meant)."""
    found = contexts(route)
    if len(set(found.values())) < 2:
        return None
    listed = ", ".join(f"{url}: {context}" for url, context in found.items())
    return (
        f"the model {route.names[0]!r} has different largest contexts on its gateways ({listed}): "
        f"HAProxy sends a request to any of them, so a prompt over {min(found.values())} tokens "
        "fails with 400 on some and not on others"
    )


def say(message: str) -> None:
    print(f"llm-gateway front: {message}", file=sys.stderr)
