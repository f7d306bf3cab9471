"""The llm-gateway command: run the daemon, or check a config; `llm-gateway front --help`
writes an HAProxy configuration for several gateways."""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from gateway import __version__
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.front import cli as front
from gateway.server import GatewayServer
from gateway.utils.logger import RecentLines, setup_logging

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_LISTEN = 3
OPEN_FILES_WANTED = 65536  # when the hard limit is unlimited

log = logging.getLogger("gateway")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llm-gateway", description=__doc__)
    parser.add_argument("--config", default="example.cfg.lua", help="the Lua config file")
    parser.add_argument("--check-config", metavar="FILE", help="validate FILE and exit")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    parser.add_argument(
        "--loop",
        default="auto",
        choices=["auto", "uvloop", "asyncio"],
        help="event loop: uvloop when installed (auto), or the standard one",
    )
    parser.add_argument("--version", action="version", version=f"llm-gateway {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["front"]:  # the one subcommand; the daemon's own options stay flat
        return front.main(argv[1:])
    args = parse_args(argv)
    if args.check_config:
        return check_config(args.check_config)
    recent = setup_logging(args.log_level, args.log_format)
    raise_open_files_limit()
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log.error("config error: %s", exc)
        return EXIT_CONFIG
    return run_loop(serve(config, recent), args.loop)


def raise_open_files_limit() -> None:
    """Take the hard limit of open files: a stream holds two sockets (its client's and its
    engine's), and the usual soft limit of 1024 would refuse connections near 500 streams."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, OPEN_FILES_WANTED)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (OSError, ValueError) as exc:
        log.warning("open files limit stays %d (the hard limit is %s): %s", soft, hard, exc)


def run_loop(main_coro: Coroutine[Any, Any, int], loop: str) -> int:
    """uvloop roughly halves the CPU the gateway spends per streamed chunk."""
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                raise
        else:
            return uvloop.run(main_coro)
    return asyncio.run(main_coro)


def check_config(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    variants = sum(len(m.variants) for m in config.models)
    print(f"{path}: ok ({len(config.models)} models, {variants} variants)")
    return EXIT_OK


async def serve(config: GatewayConfig, recent: RecentLines | None = None) -> int:
    server = GatewayServer(config, recent)
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[int] = loop.create_future()  # the signal that asked for the stop

    def stop_on(sig: int) -> None:
        if not stop.done():
            stop.set_result(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_on, sig)
    reloads: set[asyncio.Task[None]] = set()  # kept, so that a running reload is not collected

    def reload_on_sighup() -> None:
        task = asyncio.create_task(_reload(server))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_on_sighup)
    try:
        await server.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)  # listening, or the prompt cache's folder
        await server.stop(announce=False)
        return EXIT_LISTEN
    signalled = await stop
    hurry = asyncio.Event()  # a second SIGTERM or SIGINT: skip what is left of the delay
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, hurry.set)
    # SIGTERM (systemd, Kubernetes) announces the shutdown to a load balancer first;
    # Ctrl-C at a terminal stops at once.
    await server.stop(announce=signalled == signal.SIGTERM, hurry=hurry)
    return EXIT_OK


async def _reload(server: GatewayServer) -> None:
    try:
        await server.reload()
    except ConfigError:
        pass  # logged; the old config stays
    except Exception:
        log.exception("config reload failed")


if __name__ == "__main__":
    sys.exit(main())
