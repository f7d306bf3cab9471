"""EngineManager: the supervisor's effects on engines. Start one until healthy; stop one.

It decides nothing: the supervisor says which variant, and gets back a ready
`EngineInstance` or a `StartFailed` that says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import aiohttp

from gateway.config.schema import EngineKind, GatewayConfig, Model, PromptCache, Timeouts, Variant
from gateway.engine import footprint
from gateway.engine.adapter import EngineAdapter, Launch, RunningRoom, StartFailed
from gateway.engine.client import EngineClient, EngineRequestError, new_session
from gateway.engine.counting import TemplateOverhead, TokenCounter
from gateway.engine.gguf import longest_token_bytes
from gateway.engine.process import EngineProcess
from gateway.engine.prompt_cache import SAVE_BUDGET, PromptKeeper, PromptStore
from gateway.engine.remote import RemoteLink
from gateway.engine.stream import EngineStream, SpareConnection, spare_for
from gateway.engine.types import adapter_for
from gateway.models import PromptShape, Room, byte_bound
from gateway.utils.metrics import Metrics
from gateway.utils.sizes import human_bytes

log = logging.getLogger("gateway.engine")

# Seconds between health polls of a starting engine: a tiny model is healthy ~25 ms
# after spawn, a large one after minutes; polls start fast and slow down to the last.
HEALTH_POLLS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25)
SETTLE_POLL = 0.05  # seconds between looks at a stopping engine's slots
SETTLE_WAIT = 1.0  # seconds a stopping engine's slots get to stop decoding


@dataclass(eq=False)
class EngineInstance:
    """A healthy engine: what runs, where, and what it can take."""

    model: Model
    variant: Variant
    engine: EngineAdapter  # the engine type's adapter
    process: EngineProcess | RemoteLink
    client: EngineClient
    port: int | None  # None: an upstream (the client's base_url says where)
    served_name: str
    slot_context: int
    kv_budget: int | None  # tokens concurrent requests share; None: each slot has its own
    slots: int  # sequences it runs at once
    slot_cap: int | None  # sequences the gateway sends it at once; None: no cap
    counter: TokenCounter | None  # how it counts prompts exactly; None: it cannot
    overhead: TemplateOverhead | None  # None when its chat template could not be measured
    startup_seconds: float
    exited: asyncio.Task[int] = field(repr=False)
    prompts: PromptKeeper | None = field(default=None, repr=False)  # saves and restores its slots
    restored_prompts: set[str] = field(default_factory=set, repr=False)  # saved files it took
    # Requests in flight on it (awaiting their answer's headers, or being relayed), so
    # that a drain timeout can end them at once.
    open_requests: set[asyncio.Future[EngineStream]] = field(default_factory=set, repr=False)
    open_responses: set[EngineStream] = field(default_factory=set, repr=False)
    cut_off_reason: str | None = None  # why what was in flight on it was ended
    spare: SpareConnection | None = field(default=None, repr=False)  # a local engine's next connection

    def cut_off(self, reason: str) -> None:
        """End what is still in flight now: drain_timeout passed (llama-server does not
        stop on SIGTERM while a slot generates), or an upstream stopped answering; the
        clients should know now."""
        self.cut_off_reason = reason
        for opening in list(self.open_requests):
            opening.cancel()
        for response in list(self.open_responses):
            response.close()

    def heard_since(self, when: float) -> bool:
        """Whether one of its answers in flight brought bytes since `when` (loop time),
        read as they came: not around a pause for a slow client (those may have waited
        in the kernel since before the engine stopped)."""
        return any(s.last_read >= when and s.last_paused < when for s in self.open_responses)

    @property
    def where(self) -> str:
        """Where it runs, for log lines: its pid and port, or the upstream's URL."""
        if self.port is None:
            return f"upstream {self.client.base_url}"
        return f"pid {self.process.pid} port {self.port}"

    @property
    def room(self) -> Room:
        return Room(self.slot_context, self.kv_budget, self.slots)

    def upper_bound(self, kind: str, shape: PromptShape) -> int | None:
        """A proven upper bound of a prompt's tokens on this engine, if there is one."""
        return byte_bound(kind, shape, self.overhead.upper_bound if self.overhead else None)


class EngineManager:
    """Starts and stops engines; owns the HTTP session all engine traffic uses."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._metrics = metrics or Metrics()
        self._prompts: PromptKeeper | None = None  # set up by the first config, when on
        self._prompt_config: PromptCache | None = None
        self._prompt_cache_set = False
        self._sessions: tuple[aiohttp.ClientSession, aiohttp.ClientSession] | None = None
        self._processes: set[EngineProcess] = set()  # spawned and not yet reaped
        self._longest_token: dict[str, int | None] = {}  # model file -> its longest token
        self._footprints: dict[Variant, int | None] = {}  # estimated bytes, per variant
        self._slot_dir: str | None = None  # made on first start, removed at close

    def client(
        self, base_url: str, health_path: str = "/health", headers: dict[str, str] | None = None
    ) -> EngineClient:
        if self._sessions is None:  # made on first use: a session needs the running loop
            self._sessions = (new_session(reuse=True), new_session(reuse=False))
        return EngineClient(*self._sessions, base_url, health_path, headers)

    async def close(self) -> None:
        for session in self._sessions or ():
            await session.close()
        if self._slot_dir is not None:
            shutil.rmtree(self._slot_dir, ignore_errors=True)
        if self._prompts is not None:
            self._prompts.store.close()

    def kill_all_now(self) -> None:
        """The last resort of a shutdown that ran out of time: no engine outlives us,
        including one still starting."""
        for process in list(self._processes):
            process.kill_now()

    def capacity(self, variant: Variant, model: Model) -> Room:
        return adapter_for(model).capacity(variant, model)

    def learn(self, config: GatewayConfig) -> None:
        """Read what the config's model files tell, and set up the prompt cache on the
        first config (blocking: run it in a thread)."""
        self._set_up_prompt_cache(config.server.prompt_cache)
        for variant in (v for m in config.models for v in m.variants if m.engine.local):
            if variant.model_file and variant.model_file not in self._longest_token:
                self._longest_token[variant.model_file] = longest_token_bytes(variant.model_file)
            if variant not in self._footprints:
                estimate = footprint.estimate(variant)
                self._footprints[variant] = estimate.total if estimate is not None else None

    def _set_up_prompt_cache(self, wanted: PromptCache | None) -> None:
        if not self._prompt_cache_set:
            self._prompt_cache_set, self._prompt_config = True, wanted
            if wanted is not None:
                self._prompts = PromptKeeper(PromptStore(wanted), self._metrics)
                log.info(
                    "prompt cache in %s, at most %s", self._prompts.store.folder, human_bytes(wanted.max_size)
                )
        elif wanted != self._prompt_config:
            log.warning("server.prompt_cache changes take effect at the next start of the gateway")

    def cached_prompts(self) -> dict[str, list[dict[str, Any]]]:
        """The saved conversations per model (empty with the prompt cache off)."""
        return self._prompts.store.describe() if self._prompts is not None else {}

    def footprint(self, variant: Variant) -> int | None:
        """The bytes the variant's engine is predicted to take (see engine/footprint.py)."""
        return self._footprints.get(variant)

    def measure(self, instance: EngineInstance) -> int | None:
        """The bytes the engine takes now: its GPU memory, else its resident memory
        (none for an upstream)."""
        return footprint.measure(instance.process.pid) if instance.process.pid else None

    def longest_token(self, variant: Variant) -> int | None:
        """The UTF-8 length of the longest token of the variant's model, when known."""
        return self._longest_token.get(variant.model_file) if variant.model_file else None

    async def start(self, model: Model, variant: Variant) -> EngineInstance:
        """Spawn the variant's engine and wait until it is healthy, or probe an upstream
        once (or raise StartFailed)."""
        adapter = adapter_for(model)
        launch = adapter.launch(model, variant, self._slot_folder())
        if launch is None:
            return await self._reach(adapter, model, variant)
        process = EngineProcess(launch.argv, launch.env, label=variant.key)
        listening = process.watch(launch.listening_pattern) if launch.listening_pattern else None
        try:
            await process.spawn()
        except OSError as exc:
            raise StartFailed("spawn", f"cannot start {launch.argv[0]}: {exc.strerror or exc}") from None
        exited = asyncio.create_task(process.wait(), name=f"engine-exit {variant.key}")
        self._processes.add(process)
        exited.add_done_callback(lambda _: self._processes.discard(process))
        log.info("engine start %s pid=%s: %s", variant.key, process.pid, " ".join(process.argv))
        try:
            async with asyncio.timeout(variant.timeouts.startup):
                port = await _port(launch, process, listening, exited)
                return await self._until_ready(adapter, model, variant, process, port, exited)
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
        adapter: EngineAdapter,
        model: Model,
        variant: Variant,
        process: EngineProcess,
        port: int,
        exited: asyncio.Task[int],
    ) -> EngineInstance:
        client = self.client(adapter.base_url(model, port), adapter.health_path(model))
        for poll in itertools.count():
            status, _ = await client.health(variant.timeouts.health_check)
            _raise_if_exited(process, exited)
            if status == 200:
                break
            await asyncio.sleep(HEALTH_POLLS[min(poll, len(HEALTH_POLLS) - 1)])
        return await self._instance(adapter, model, variant, process, client, port, exited)

    def _slot_folder(self) -> str:
        """Where engines save slots: the prompt cache's folder, else one of its own."""
        if self._prompts is not None:
            return str(self._prompts.store.folder)
        if self._slot_dir is None:
            self._slot_dir = tempfile.mkdtemp(prefix="llm-gateway-slots-")
        return self._slot_dir

    def _keeper(self, model: Model, variant: Variant) -> PromptKeeper | None:
        """The prompt keeper of a llama.cpp engine that saves into the cache's folder."""
        keeps = model.engine is EngineKind.LLAMA_CPP and "--slot-save-path" not in (
            *model.args,
            *variant.args,
        )
        return self._prompts if keeps else None

    async def _reach(self, adapter: EngineAdapter, model: Model, variant: Variant) -> EngineInstance:
        """An upstream: ready once its health path answers 200."""
        url = adapter.base_url(model, 0)
        client = self.client(url, adapter.health_path(model), adapter.request_headers(model))
        link = RemoteLink(variant.key, url)
        problem = await adapter.probe(client, variant.timeouts.health_check)
        if problem is not None:
            raise StartFailed("unreachable", f"{variant.key}: {problem}")
        exited = asyncio.create_task(link.wait(), name=f"upstream {variant.key}")
        try:
            return await self._instance(adapter, model, variant, link, client, None, exited)
        except BaseException:
            link.kill_now()
            raise

    async def _instance(
        self,
        adapter: EngineAdapter,
        model: Model,
        variant: Variant,
        process: EngineProcess | RemoteLink,
        client: EngineClient,
        port: int | None,
        exited: asyncio.Task[int],
    ) -> EngineInstance:
        """The ready engine, with what it offers and its chat template measured."""
        room: RunningRoom = await adapter.running_room(client, model, variant)
        counter = adapter.counter(model)
        overhead = None
        if counter is not None:  # (an engine that cannot measure it still serves, unbounded)
            with contextlib.suppress(
                EngineRequestError, KeyError, TypeError, ValueError, OverflowError, TimeoutError
            ):
                async with asyncio.timeout(variant.timeouts.health_check):
                    overhead = await counter.template_overhead(client, adapter.rewrite(model, {}))
        spare = spare_for(client.base_url) if port is not None and adapter.spare_connection else None
        if spare is not None:
            spare.open_next()
            exited.add_done_callback(lambda _: spare.close())
        return EngineInstance(
            model=model,
            variant=variant,
            engine=adapter,
            process=process,
            client=client,
            port=port,
            served_name=variant.served_name,
            slot_context=room.slot_context,
            slots=room.slots,
            kv_budget=room.kv_budget,
            slot_cap=room.slot_cap,
            counter=counter,
            overhead=overhead,
            startup_seconds=time.monotonic() - process.started_monotonic,
            exited=exited,
            prompts=self._keeper(model, variant),
            spare=spare,
        )

    async def stop(self, instance: EngineInstance) -> int:
        """Stop it; the exit code.

        1. Close its spare connection.
        2. Wait, at most SETTLE_WAIT, until no slot decodes: streams cut off by a drain
           timeout end at the engine within milliseconds, but llama-server (b11434)
           decodes a non-streamed request whose client left on to its max_tokens.
        3. Save its idle slots to the prompt cache, unless it exited or its /slots does
           not answer; within SETTLE_WAIT more if a slot still decodes (a save waits
           behind the batch being decoded, and a long prompt's batch takes seconds).
        4. No slot decodes: SIGTERM, then SIGKILL after the stop timeout. One still
           decodes, or /slots does not answer: SIGKILL at once. llama-server's SIGTERM
           handler takes its task queue's lock, which the main thread holds for moments
           while decoding: a signal landing then deadlocks it (seen in gdb)."""
        if instance.spare is not None:
            instance.spare.close()
        timeout = instance.variant.timeouts.stop
        settle = await _settle(instance, min(SETTLE_WAIT, timeout))
        if instance.prompts is not None:
            if settle is not Settle.SILENT and not instance.exited.done():
                budget = SAVE_BUDGET if settle is Settle.IDLE else SETTLE_WAIT
                await instance.prompts.save_all(instance.client, instance.model, instance.variant, budget)
            instance.prompts.forget_engine(instance.client)
        if settle is Settle.IDLE:
            return await instance.process.stop(timeout)
        log.warning("%s %s %s: SIGKILL", instance.variant.key, instance.where, settle.value)
        return await instance.process.stop(0)

    async def busy_tasks(self, instance: EngineInstance) -> frozenset[int]:
        """The ids of the tasks the engine's slots are processing now."""
        return await instance.engine.busy_tasks(instance.client)

    async def clear_idle_slots(self, instance: EngineInstance) -> None:
        """Have the engine erase what its idle slots keep."""
        await instance.engine.clear_idle_slots(instance.client)

    async def probe(self, instance: EngineInstance) -> str | None:
        """None while the engine is well (see EngineAdapter.probe), else what is wrong."""
        started = asyncio.get_running_loop().time()
        problem = await instance.engine.probe(instance.client, instance.variant.timeouts.health_check)
        if problem is not None and instance.heard_since(started):
            # Its answers flow: the probe's answer was read late (the gateway's own loop
            # was busy), not missed. Killing it would cut off every stream it serves.
            log.warning("%s: %s, but its streams answer meanwhile: not frozen", instance.variant.key, problem)
            return None
        if problem is not None and isinstance(instance.process, RemoteLink):
            instance.process.note(problem)
        return problem


def longest_stop(timeouts: Timeouts) -> float:
    """The longest a stop may take: the settle wait, the saves, then SIGTERM's wait."""
    return min(SETTLE_WAIT, timeouts.stop) + SAVE_BUDGET + timeouts.stop


class Settle(Enum):
    """How a stopping engine's slots ended up: what its stop may send."""

    IDLE = "no slot decodes"  # or it cannot tell: no /slots, another kind, exited
    DECODING = "still decodes a request whose client is gone"
    SILENT = "does not answer /slots"


async def _settle(instance: EngineInstance, wait: float) -> Settle:
    """Look at its slots until none decodes, for at most `wait` seconds."""
    answered = False
    try:
        async with asyncio.timeout(wait):
            while not instance.exited.done() and await instance.engine.busy_tasks(instance.client):
                answered = True
                await asyncio.sleep(SETTLE_POLL)
    except TimeoutError:
        return Settle.DECODING if answered else Settle.SILENT
    except (EngineRequestError, KeyError, TypeError, ValueError):
        pass
    return Settle.IDLE


async def _port(
    launch: Launch,
    process: EngineProcess,
    listening: asyncio.Future[re.Match[str]] | None,
    exited: asyncio.Task[int],
) -> int:
    """Where the engine listens: on the port its command line gave, or on the one its
    output names."""
    if listening is None:
        assert launch.port is not None
        return launch.port
    await asyncio.wait([listening, exited], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
    if listening.done() and listening.exception() is not None:
        await exited  # its output ended because it is exiting
    _raise_if_exited(process, exited)
    return int(listening.result().group(1))


def _raise_if_exited(process: EngineProcess, exited: asyncio.Task[int]) -> None:
    if exited.done():
        raise StartFailed(
            "exited",
            f"{process.label} exited with code {exited.result()} while starting",
            process.last_lines(),
        )
