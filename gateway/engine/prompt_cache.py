"""The prompt cache: llama.cpp engine slots saved before a stop, restored into the next
engine of the same model (any context, any slot count) for the request that continues
what they hold.

`PromptStore` keeps the files and what each holds; `PromptKeeper` saves and restores
through an engine. Neither may cost a request anything: a save or restore that fails or
takes too long is skipped (logged), and the request runs as it would have.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import tempfile
import time
import uuid
from array import array
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.config.schema import Model, PromptCache, Variant
from gateway.engine.client import EngineAnswered, EngineClient, EngineRequestError
from gateway.engine.counting import LlamaCppCounter
from gateway.engine.llamacpp import LlamaCppEngine
from gateway.engine.slotfile import UnreadableSlotFile, as_tokens, common_prefix, digest, read_tokens
from gateway.utils.metrics import Metrics
from gateway.utils.sizes import human_bytes

log = logging.getLogger("gateway.prompt_cache")

MIN_TOKENS = 256  # a slot holding fewer is not worth a file, nor a restore
SAVE_WAIT = 5.0  # seconds one save may take before it is skipped
SAVE_BUDGET = 10.0  # seconds all saves of one stopping engine may take
RESTORE_WAIT = 5.0  # seconds one restore may take before the request goes on without it
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_LLAMA_CPP = LlamaCppEngine()  # the keeper serves llama.cpp engines only


# Engine flags that change neither the values a KV cache holds nor whether a saved one
# can be restored, with the number of values each takes: a slot saved by an engine is
# valid in one whose args differ only in these. Any other flag is part of what a saved
# KV cache is valid for (when in doubt, a flag is: --rope-scale, for one, gives other
# values for the same tokens). -c, --host and --port never appear: the config refuses them.
_NEUTRAL: dict[str, int] = {
    flag: values
    for flags, values in (
        ("-t --threads -tb --threads-batch --threads-http", 1),  # how many threads compute it
        ("-np --parallel", 1),  # how many slots share it (Source has the KV streams)
        ("-kvu --kv-unified -no-kvu --no-kv-unified", 0),  # likewise
        ("--slot-save-path -a --alias -lv --verbosity --log-verbosity --log-file", 1),  # files, name, log
        ("--metrics --slots --no-slots -v --verbose --log-verbose", 0),  # endpoints, log
        ("-m --model -ctk --cache-type-k -ctv --cache-type-v", 1),  # in Source as what they resolve to
    )
    for flag in flags.split()
}


def kv_args(args: Iterable[str]) -> tuple[str, ...]:
    """The engine arguments that can change what its KV cache holds: all but the neutral
    flags and their values (llama-server reads "--a_b" as "--a-b")."""
    kept: list[str] = []
    rest = iter(args)
    for arg in rest:
        values = _NEUTRAL.get(arg.replace("_", "-") if arg.startswith("--") else arg)
        if values is None:
            kept.append(arg)
        for _ in range(values or 0):
            next(rest, None)
    return tuple(kept)


@dataclass(frozen=True)
class Source:
    """What a saved KV cache is only valid for: the model file as it was, the cache types,
    the number of KV streams (llama.cpp restores a slot only into an engine with as many)
    and the engine arguments that can change the cache's values."""

    model_file: str
    file_size: int
    file_mtime_ns: int
    cache_type_k: str
    cache_type_v: str
    kv_streams: int
    args: tuple[str, ...]

    @classmethod
    def of(cls, model: Model, variant: Variant) -> Source | None:
        if variant.model_file is None:
            return None
        try:
            stat = os.stat(variant.model_file)
        except OSError:
            return None
        # One stream per slot when each slot has a cache of its own, else one in all.
        room = _LLAMA_CPP.capacity(variant, model)
        return cls(
            variant.model_file,
            stat.st_size,
            stat.st_mtime_ns,
            variant.cache_type_k,
            variant.cache_type_v,
            room.slots if room.shared is None else 1,
            kv_args([*model.args, *variant.args]),
        )

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Source:
        return cls(**{**meta, "args": tuple(meta["args"])})

    def same_file(self, other: Source) -> bool:
        return (self.model_file, self.file_size, self.file_mtime_ns) == (
            other.model_file,
            other.file_size,
            other.file_mtime_ns,
        )

    def mismatch(self, engine: Source) -> str | None:
        """Why a KV cache saved from this source (of the same model file) is not valid in
        an engine of `engine`, or None when it is."""
        if (self.cache_type_k, self.cache_type_v) != (engine.cache_type_k, engine.cache_type_v):
            return (
                f"saved with KV cache types {self.cache_type_k}/{self.cache_type_v}, "
                f"this engine runs {engine.cache_type_k}/{engine.cache_type_v}"
            )
        if self.kv_streams != engine.kv_streams:
            return (
                f"saved from {self.kv_streams} KV cache stream(s), this engine has {engine.kv_streams} "
                "(-np N without --kv-unified gives each slot its own)"
            )
        if self.args != engine.args:
            saved, running = shlex.join(self.args), shlex.join(engine.args)
            return f'saved with engine args "{saved}", this engine runs "{running}"'
        return None


@dataclass(eq=False)
class SavedPrompt:
    """One saved slot: the model it belongs to and the tokens it holds."""

    path: Path
    model: str
    source: Source
    tokens: array[int] = field(repr=False)
    digest: str
    saved_at: float
    last_used: float

    @property
    def size(self) -> int:
        with contextlib.suppress(OSError):
            return self.path.stat().st_size
        return 0

    def meta(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "source": asdict(self.source),
            "tokens": len(self.tokens),
            "digest": self.digest,
            "saved_at": self.saved_at,
            "last_used": self.last_used,
        }


class TooLarge(Exception):
    """A slot file larger than max_size: kept, it would be dropped at once."""


# What skips a save: the engine's answer, the file, the disk, or max_size.
_SAVE_SKIPPED = (
    TimeoutError,
    EngineRequestError,
    UnreadableSlotFile,
    TooLarge,
    OSError,
    ValueError,
    TypeError,
)


class PromptStore:
    """The saved prompts of every model: files in one folder (each `.bin` with a `.json`
    that says what it holds, so that a configured folder outlives a restart), at most
    `max_size` bytes of them."""

    def __init__(self, config: PromptCache) -> None:
        self.owned = config.dir is None  # a temporary folder of its own: removed at close
        self.folder = Path(config.dir or tempfile.mkdtemp(prefix="llm-gateway-prompts-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_size = config.max_size
        self.saved: list[SavedPrompt] = []
        self._load()

    def _load(self) -> None:
        """What an earlier run of the gateway saved in this folder."""
        for meta_path in sorted(self.folder.glob("*.json")):
            saved = _read_meta(meta_path)
            if saved is not None:
                self.saved.append(saved)
        if self.saved:
            log.info("prompt cache: %d saved slots found in %s", len(self.saved), self.folder)

    def waiting(self, model: str, restored: set[str]) -> bool:
        """Whether `model` has saved prompts an engine that took `restored` has not."""
        return any(saved.model == model and saved.path.name not in restored for saved in self.saved)

    def new_path(self, model: str) -> Path:
        return self.folder / f"{_UNSAFE.sub('_', model)[:64]}-{uuid.uuid4().hex[:12]}.bin"

    def add(self, model: str, source: Source, path: Path) -> SavedPrompt:
        """Index a file an engine just wrote; one that holds the same tokens is dropped
        (a shorter one it extends is kept: a later branch of the conversation may fit
        only that). Raises UnreadableSlotFile, TooLarge or OSError: the file is removed
        then, and nothing indexed whose .json is not written (a full disk)."""
        try:
            size = path.stat().st_size
            if size > self.max_size:
                raise TooLarge(f"{human_bytes(size)}, larger than max_size {human_bytes(self.max_size)}")
            tokens = read_tokens(path)
            now = time.time()
            saved = SavedPrompt(path, model, source, tokens, digest(tokens), now, now)
            path.with_suffix(".json").write_text(json.dumps(saved.meta()))
        except (UnreadableSlotFile, TooLarge, OSError):
            _remove(path, path.with_suffix(".json"))
            raise
        for older in [s for s in self.saved if s.model == model and s.digest == saved.digest]:
            self.forget(older, "saved again")
        self.saved.append(saved)
        self._trim()
        return saved

    def match(
        self, model: str, source: Source, tokens: list[int], room: int
    ) -> tuple[SavedPrompt, int] | None:
        """The saved prompt of `model` that shares the longest start with `tokens` (at
        least MIN_TOKENS) and takes at most `room` tokens of the engine's cache (the
        request's own reservation: what it restores beyond the shared start is dropped
        as the prompt is processed), among those valid for an engine of `source`. Those
        of an older model file are dropped on the way."""
        wanted = as_tokens(tokens)
        if wanted is None:
            return None
        best: tuple[SavedPrompt, int] | None = None
        for saved in [s for s in self.saved if s.model == model]:
            if not saved.source.same_file(source):
                self.forget(saved, f"the model file {source.model_file} changed since it was saved")
                continue
            if len(saved.tokens) > room:
                continue
            shared = common_prefix(saved.tokens, wanted)
            if shared < MIN_TOKENS or (best is not None and shared <= best[1]):
                continue
            why = saved.source.mismatch(source)
            if why is not None:
                log.info("prompt cache: %d saved tokens of %s not restored: %s", shared, model, why)
                continue
            best = (saved, shared)
        return best

    def touch(self, saved: SavedPrompt) -> None:
        saved.last_used = time.time()
        with contextlib.suppress(OSError):
            saved.path.with_suffix(".json").write_text(json.dumps(saved.meta()))

    def forget(self, saved: SavedPrompt, why: str) -> None:
        if saved in self.saved:
            self.saved.remove(saved)
        log.info(
            "prompt cache: dropped %s (%s, %d tokens): %s",
            saved.path.name,
            saved.model,
            len(saved.tokens),
            why,
        )
        _remove(saved.path, saved.path.with_suffix(".json"))

    def _trim(self) -> None:
        """Least recently used first, until the files fit max_size."""
        by_age = sorted(self.saved, key=lambda s: s.last_used)
        total = sum(s.size for s in by_age)
        while by_age and total > self.max_size:
            oldest = by_age.pop(0)
            total -= oldest.size
            self.forget(oldest, f"over max_size {human_bytes(self.max_size)}")

    def describe(self) -> dict[str, list[dict[str, Any]]]:
        """The cached conversations per model, for /gateway/state."""
        shown: dict[str, list[dict[str, Any]]] = {}
        for saved in sorted(self.saved, key=lambda s: -s.last_used):
            shown.setdefault(saved.model, []).append(
                {
                    "file": saved.path.name,
                    "tokens": len(saved.tokens),
                    "bytes": saved.size,
                    "cache_types": f"{saved.source.cache_type_k}/{saved.source.cache_type_v}",
                    "saved_at": saved.saved_at,
                    "last_used": saved.last_used,
                }
            )
        return shown

    def close(self) -> None:
        if self.owned:
            shutil.rmtree(self.folder, ignore_errors=True)


def _remove(*paths: Path) -> None:
    """Remove files of the cache. One that cannot be (a read-only folder, a directory in
    its place) is left, with one log line: no request or stop may fail for it."""
    left: list[str] = []
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            left.append(f"{path}: {exc.strerror or exc}")
    if left:
        log.warning("prompt cache: cannot remove %s", "; ".join(left))


def _read_meta(meta_path: Path) -> SavedPrompt | None:
    path = meta_path.with_suffix(".bin")
    try:
        meta = json.loads(meta_path.read_text())
        tokens = read_tokens(path)
        if digest(tokens) != meta["digest"]:
            raise UnreadableSlotFile(f"{path.name}: its tokens are not what was saved")
        return SavedPrompt(
            path,
            meta["model"],
            Source.from_meta(meta["source"]),
            tokens,
            meta["digest"],
            meta["saved_at"],
            meta["last_used"],
        )
    except (OSError, ValueError, KeyError, TypeError, UnreadableSlotFile) as exc:
        log.warning("prompt cache: %s is not used: %s", meta_path.name, exc)
        return None


class PromptKeeper:
    """Saves a stopping engine's slots and restores them into a later engine."""

    def __init__(self, store: PromptStore, metrics: Metrics) -> None:
        self.store = store
        self._metrics = metrics
        self._counter = LlamaCppCounter()
        self._restoring: dict[EngineClient, asyncio.Lock] = {}

    async def save_all(
        self, client: EngineClient, model: Model, variant: Variant, budget: float = SAVE_BUDGET
    ) -> None:
        """Save each idle slot that holds MIN_TOKENS or more, in at most `budget` seconds."""
        source = Source.of(model, variant)
        if source is None:
            return
        try:
            async with asyncio.timeout(budget):
                for slot in await client.get_json("/slots"):
                    if not slot.get("is_processing") and int(slot.get("n_prompt_tokens") or 0) >= MIN_TOKENS:
                        await self._save(client, model.name, variant, source, int(slot["id"]))
        except TimeoutError:
            log.warning("prompt cache: saving %s took over %gs: the rest is skipped", variant.key, budget)
        except (EngineRequestError, KeyError, TypeError, ValueError, OSError) as exc:
            log.warning("prompt cache: saving %s failed: %s", variant.key, exc)

    async def _save(
        self, client: EngineClient, model: str, variant: Variant, source: Source, slot: int
    ) -> None:
        path = self.store.new_path(model)
        began = time.monotonic()
        try:
            answer = await asyncio.wait_for(
                client.post_json(f"/slots/{slot}?action=save", {"filename": path.name}), SAVE_WAIT
            )
            if int(answer.get("n_saved", 0)) < MIN_TOKENS:
                _remove(path)
                return
            saved = self.store.add(model, source, path)
        except _SAVE_SKIPPED as exc:
            _remove(path)
            outcome = "too_large" if isinstance(exc, TooLarge) else "failed"
            self._metrics.prompt_cache_saves.labels(model, outcome).inc()
            log.warning(
                "prompt cache: save of %s slot %d skipped: %s", variant.key, slot, exc or type(exc).__name__
            )
            return
        self._metrics.prompt_cache_saves.labels(model, "saved").inc()
        log.info(
            "prompt cache save %s slot %d: %d tokens in %.0f ms (%s)",
            variant.key,
            slot,
            len(saved.tokens),
            (time.monotonic() - began) * 1000,
            human_bytes(saved.size),
        )

    async def restore_for(
        self,
        client: EngineClient,
        model: Model,
        variant: Variant,
        kind: str,
        body: dict[str, Any],
        reserve: int,
        most: int | None,
        restored: set[str],
    ) -> int | None:
        """Restore the saved prompt this request continues into an idle slot of the
        engine; the slot, for the request's `id_slot`, or None. `reserve`: the tokens
        reserved for its answer; `most`: the most tokens its prompt can have, if known;
        `restored`: the files this engine has taken already (the engine finds those itself).
        A request that cannot share enough with any saved prompt is not tokenized."""
        if (most is not None and most < MIN_TOKENS) or not self.store.waiting(model.name, restored):
            return None
        source = Source.of(model, variant)
        if source is None:
            return None
        try:
            tokens = await self._counter.tokens(client, kind, body)
        except (EngineRequestError, KeyError, TypeError, ValueError):
            return None
        found = self.store.match(model.name, source, tokens, len(tokens) + reserve) if tokens else None
        if found is None or found[0].path.name in restored:
            return None
        lock = self._restoring.setdefault(client, asyncio.Lock())
        async with lock:  # two restores must not pick the same idle slot
            return await self._restore(client, variant, found[0], restored)

    async def _restore(
        self, client: EngineClient, variant: Variant, saved: SavedPrompt, restored: set[str]
    ) -> int | None:
        began = time.monotonic()
        try:
            done = await _restore_with_room(client, variant, saved, restored)
        except (TimeoutError, EngineRequestError, KeyError, TypeError, ValueError, OSError) as exc:
            self._metrics.prompt_cache_restores.labels(saved.model, "failed").inc()
            self.store.forget(saved, f"the restore into {variant.key} failed: {exc or type(exc).__name__}")
            return None
        if done is None:
            return None
        slot, count = done
        restored.add(saved.path.name)
        self.store.touch(saved)
        self._metrics.prompt_cache_restores.labels(saved.model, "restored").inc()
        self._metrics.prompt_cache_tokens_restored.labels(saved.model).inc(count)
        log.info(
            "prompt cache restore %s slot %d: %d tokens in %.0f ms (%s)",
            variant.key,
            slot,
            count,
            (time.monotonic() - began) * 1000,
            saved.path.name,
        )
        return slot

    def forget_engine(self, client: EngineClient) -> None:
        self._restoring.pop(client, None)


async def _restore_with_room(
    client: EngineClient, variant: Variant, saved: SavedPrompt, restored: set[str]
) -> tuple[int, int] | None:
    """Restore `saved` into an idle slot; once refused, again after the engine erased its
    idle slots. llama-server refuses a file for a cache without room in the words it has
    for a damaged one, and the cells idle slots keep of earlier requests may take that
    room: only a second refusal (raised) means the file is bad."""
    try:
        return await _restore_into_idle_slot(client, saved)
    except EngineAnswered as refused:
        log.info(
            "prompt cache: %s refused by %s (%s): its idle slots are erased and it is tried again",
            saved.path.name,
            variant.key,
            refused.engine_message,
        )
    await _LLAMA_CPP.clear_idle_slots(client)
    restored.clear()  # the files it had taken may have been in those slots
    return await _restore_into_idle_slot(client, saved)


async def _restore_into_idle_slot(client: EngineClient, saved: SavedPrompt) -> tuple[int, int] | None:
    """The idle slot `saved` was restored into and the tokens restored; None when no slot
    is idle."""
    slot = await _idle_slot(client)
    if slot is None:
        return None
    answer = await asyncio.wait_for(
        client.post_json(f"/slots/{slot}?action=restore", {"filename": saved.path.name}), RESTORE_WAIT
    )
    return slot, int(answer["n_restored"])


async def _idle_slot(client: EngineClient) -> int | None:
    """An idle slot, one that never ran a request first."""
    idle = [s for s in await client.get_json("/slots") if not s.get("is_processing")]
    idle.sort(key=lambda s: int(s.get("n_prompt_tokens") or 0))
    return int(idle[0]["id"]) if idle else None
