"""EngineManager: the supervisor's effects on engines. Start one until healthy; stop one.

It decides nothing: the supervisor says which variant, and gets back a ready
`EngineInstance` or a `StartFailed` that says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import aiohttp

from gateway.config.schema import GatewayConfig, Model, Variant
from gateway.engine import footprint
from gateway.engine.binary import BinaryNotFound, find_llama_server
from gateway.engine.client import EngineClient, EngineRequestError, new_session
from gateway.engine.gguf import longest_token_bytes
from gateway.engine.llamacpp import LlamaCppEngine, TemplateOverhead
from gateway.engine.process import EngineProcess
from gateway.models import PromptShape, Room, byte_bound

log = logging.getLogger("gateway.engine")

HEALTH_POLL_INTERVAL = 0.005  # a tiny model is healthy ~25 ms after spawn


class StartFailed(Exception):
    """An engine did not become healthy; `kind` is spawn, exited or timeout."""

    def __init__(self, kind: str, message: str, last_lines: list[str] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.last_lines = last_lines or []


@dataclass(eq=False)
class EngineInstance:
    """A healthy engine: what runs, where, and what it can take."""

    model: Model
    variant: Variant
    engine: LlamaCppEngine  # the engine type's adapter
    process: EngineProcess
    client: EngineClient
    port: int
    served_name: str
    slot_context: int
    kv_budget: int | None  # tokens concurrent requests share; None: each slot has its own
    slots: int  # sequences it runs at once
    overhead: TemplateOverhead | None  # None when its chat template could not be measured
    startup_seconds: float
    exited: asyncio.Task[int] = field(repr=False)
    # Requests in flight on it (awaiting their answer's headers, or being relayed), so
    # that a drain timeout can end them at once.
    open_requests: set[asyncio.Future[aiohttp.ClientResponse]] = field(default_factory=set, repr=False)
    open_responses: set[aiohttp.ClientResponse] = field(default_factory=set, repr=False)
    was_cut_off: bool = False

    def cut_off(self) -> None:
        """drain_timeout passed: end what is still in flight (llama-server does not stop
        on SIGTERM while a slot generates, and the client should know now)."""
        self.was_cut_off = True
        for opening in list(self.open_requests):
            opening.cancel()
        for response in list(self.open_responses):
            response.close()

    @property
    def room(self) -> Room:
        return Room(self.slot_context, self.kv_budget, self.slots)

    def upper_bound(self, kind: str, shape: PromptShape) -> int | None:
        """A proven upper bound of a prompt's tokens on this engine, if there is one."""
        return byte_bound(kind, shape, self.overhead.upper_bound if self.overhead else None)


class EngineManager:
    """Starts and stops engines; owns the HTTP session all engine traffic uses."""

    def __init__(self) -> None:
        self.llamacpp = LlamaCppEngine()
        self._sessions: tuple[aiohttp.ClientSession, aiohttp.ClientSession] | None = None
        self._processes: set[EngineProcess] = set()  # spawned and not yet reaped
        self._longest_token: dict[str, int | None] = {}  # model file -> its longest token
        self._footprints: dict[Variant, int | None] = {}  # estimated bytes, per variant
        self._slot_dir: str | None = None  # made on first start, removed at close

    def client(self, base_url: str) -> EngineClient:
        if self._sessions is None:  # made on first use: a session needs the running loop
            self._sessions = (new_session(reuse=True), new_session(reuse=False))
        return EngineClient(*self._sessions, base_url)

    async def close(self) -> None:
        for session in self._sessions or ():
            await session.close()
        if self._slot_dir is not None:
            shutil.rmtree(self._slot_dir, ignore_errors=True)

    def kill_all_now(self) -> None:
        """The last resort of a shutdown that ran out of time: no engine outlives us,
        including one still starting."""
        for process in list(self._processes):
            process.kill_now()

    def capacity(self, variant: Variant, model: Model) -> Room:
        return self.llamacpp.capacity(variant, model)

    def learn(self, config: GatewayConfig) -> None:
        """Read what the config's model files tell (blocking: run it in a thread)."""
        for variant in (v for m in config.models for v in m.variants):
            if variant.model_file and variant.model_file not in self._longest_token:
                self._longest_token[variant.model_file] = longest_token_bytes(variant.model_file)
            if variant not in self._footprints:
                estimate = footprint.estimate(variant)
                self._footprints[variant] = estimate.total if estimate is not None else None

    def footprint(self, variant: Variant) -> int | None:
        """The bytes the variant's engine is predicted to take (see engine/footprint.py)."""
        return self._footprints.get(variant)

    def measure(self, instance: EngineInstance) -> int | None:
        """The bytes the engine takes now: its GPU memory, else its resident memory."""
        return footprint.measure(instance.process.pid) if instance.process.pid else None

    def longest_token(self, variant: Variant) -> int | None:
        """The UTF-8 length of the longest token of the variant's model, when known."""
        return self._longest_token.get(variant.model_file) if variant.model_file else None

    async def start(self, model: Model, variant: Variant) -> EngineInstance:
        """Spawn the variant's engine and wait until it is healthy (or raise StartFailed)."""
        try:
            binary = find_llama_server(variant.binary or model.binary)
        except BinaryNotFound as exc:
            raise StartFailed("spawn", str(exc)) from None
        if self._slot_dir is None:
            self._slot_dir = tempfile.mkdtemp(prefix="llm-gateway-slots-")
        argv = self.llamacpp.argv(binary, model, variant, self._slot_dir)
        process = EngineProcess(argv, model.env, label=variant.key)
        listening = process.watch(self.llamacpp.listening_pattern)
        try:
            await process.spawn()
        except OSError as exc:
            raise StartFailed("spawn", f"cannot start {binary}: {exc.strerror or exc}") from None
        exited = asyncio.create_task(process.wait(), name=f"engine-exit {variant.key}")
        self._processes.add(process)
        exited.add_done_callback(lambda _: self._processes.discard(process))
        log.info("engine start %s pid=%s: %s", variant.key, process.pid, " ".join(process.argv))
        try:
            async with asyncio.timeout(variant.timeouts.startup):
                return await self._until_ready(model, variant, process, listening, exited)
        except TimeoutError:
            await asyncio.shield(process.stop(variant.timeouts.stop))
            raise StartFailed(
                "timeout",
                f"{variant.key} was not healthy after {variant.timeouts.startup:g}s",
                process.last_lines(),
            ) from None
        except BaseException:
            await asyncio.shield(process.stop(variant.timeouts.stop))
            raise

    async def _until_ready(
        self,
        model: Model,
        variant: Variant,
        process: EngineProcess,
        listening: asyncio.Future[re.Match[str]],
        exited: asyncio.Task[int],
    ) -> EngineInstance:
        await asyncio.wait([listening, exited], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
        if listening.done() and listening.exception() is not None:
            await exited  # its output ended because it is exiting
        _raise_if_exited(process, exited)
        port = int(listening.result().group(1))
        client = self.client(f"http://127.0.0.1:{port}")
        while True:
            status, _ = await client.health(variant.timeouts.health_check)
            _raise_if_exited(process, exited)
            if status == 200:
                break
            await asyncio.sleep(HEALTH_POLL_INTERVAL)
        slot_context, slots = await self.llamacpp.slots(client)
        overhead = None
        with contextlib.suppress(EngineRequestError, KeyError, TypeError):
            overhead = await self.llamacpp.template_overhead(client)
        return EngineInstance(
            model=model,
            variant=variant,
            engine=self.llamacpp,
            process=process,
            client=client,
            port=port,
            served_name=self.llamacpp.served_name(model, variant),
            slot_context=slot_context,
            slots=slots,
            kv_budget=self.llamacpp.shared_kv_budget(variant, model, slot_context),
            overhead=overhead,
            startup_seconds=time.monotonic() - process.started_monotonic,
            exited=exited,
        )

    async def stop(self, instance: EngineInstance) -> int:
        """SIGTERM, then SIGKILL after the stop timeout; the exit code."""
        return await instance.process.stop(instance.variant.timeouts.stop)

    async def busy_tasks(self, instance: EngineInstance) -> frozenset[int]:
        """The ids of the tasks the engine's slots are processing now."""
        return await self.llamacpp.busy_tasks(instance.client)

    async def clear_idle_slots(self, instance: EngineInstance) -> None:
        """Have the engine erase what its idle slots keep."""
        await self.llamacpp.clear_idle_slots(instance.client)

    async def probe(self, instance: EngineInstance) -> str | None:
        """None unless the engine leaves /health unanswered for its health_check timeout."""
        timeout = instance.variant.timeouts.health_check
        if await instance.client.stalls(timeout):
            return f"no answer to /health within {timeout:g}s"
        return None


def _raise_if_exited(process: EngineProcess, exited: asyncio.Task[int]) -> None:
    if exited.done():
        raise StartFailed(
            "exited",
            f"{process.label} exited with code {exited.result()} while starting",
            process.last_lines(),
        )
