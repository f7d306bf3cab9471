"""PromptStore and the slot file header, on files written the way llama-server writes
them (the real engine's files are read in test_e2e_prompt_cache.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
from array import array
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway.config.schema import EngineKind, Model, PromptCache, RequestRules, Timeouts, Variant
from gateway.engine.client import EngineAnswered
from gateway.engine.prompt_cache import MIN_TOKENS, PromptKeeper, PromptStore, Source, kv_args
from gateway.engine.slotfile import MAGIC, UnreadableSlotFile, common_prefix, read_tokens
from gateway.utils.metrics import Metrics


def slot_file(path: Path, tokens: list[int], state_bytes: int = 64) -> Path:
    words = array("i", [-1, 1, len(tokens), *tokens, 0])
    path.write_bytes(struct.pack("<III", MAGIC, 4, len(words)) + words.tobytes() + b"\0" * state_bytes)
    return path


def source(model_file: Path, k: str = "f16") -> Source:
    stat = os.stat(model_file)
    return Source(str(model_file), stat.st_size, stat.st_mtime_ns, k, "f16", 1, ())


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 60)
    return path


def llama_cpp_model(model_file: Path, *variant_args: tuple[str, ...], args: tuple[str, ...] = ()) -> Model:
    """Model "m" on `model_file`: a variant of 2048 for each of `variant_args` (default: one without)."""
    timeouts = Timeouts(health_check=1, startup=1, drain=1, stop=1, idle=0)
    variants = tuple(
        Variant("m", 2048, extra, None, timeouts, model_file=str(model_file))
        for extra in variant_args or ((),)
    )
    return Model("m", (), EngineKind.LLAMA_CPP, None, args, {}, 64, RequestRules({}, {}, ()), variants)


def store(tmp_path: Path, max_size: int = 1 << 30) -> PromptStore:
    return PromptStore(PromptCache(str(tmp_path / "cache"), max_size))


CONVERSATION = list(range(1000, 1000 + 2 * MIN_TOKENS))
REFUSED = EngineAnswered(
    "POST /slots/0?action=restore: HTTP 400",
    400,
    json.dumps(
        {
            "error": {
                "message": "Unable to restore slot: No available space in KV cache or invalid slot save file"
            }
        }
    ),
)


class FakeEngine:
    """llama-server's slot endpoints as the keeper calls them: one idle slot; a save
    writes a slot file of `tokens`, or raises `save_error`; each restore answers with
    the next of `restores`, an exception or the tokens restored."""

    def __init__(
        self,
        folder: Path,
        tokens: list[int] = CONVERSATION,
        state_bytes: int = 64,
        save_error: Exception | None = None,
        restores: tuple[Exception | int, ...] = (),
    ) -> None:
        self.folder, self.tokens, self.state_bytes, self.save_error = folder, tokens, state_bytes, save_error
        self.restores = list(restores)
        self.calls: list[str] = []

    async def get_json(self, path: str) -> Any:
        self.calls.append(path)
        return [{"id": 0, "is_processing": False, "n_prompt_tokens": len(self.tokens)}]

    async def post_json(self, path: str, body: dict[str, Any]) -> Any:
        self.calls.append(path)
        if path.endswith("action=save"):
            if self.save_error is not None:
                raise self.save_error
            slot_file(self.folder / body["filename"], self.tokens, self.state_bytes)
            return {"n_saved": len(self.tokens)}
        if path.endswith("action=restore"):
            outcome = self.restores.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return {"n_restored": outcome}
        return {}  # an erase


def counted(metrics: Metrics, name: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value(f"llm_gateway_{name}_total", {"model": "m", "outcome": outcome})
    return value or 0.0


async def restore(
    keeper: PromptKeeper, engine: FakeEngine, model_file: Path, prompt: list[int]
) -> int | None:
    """restore_for a completion of token ids (the keeper tokenizes nothing then)."""
    model = llama_cpp_model(model_file)
    client: Any = engine
    return await keeper.restore_for(
        client, model, model.variants[0], "completion", {"prompt": prompt}, 8, None, set()
    )


def test_the_header_gives_the_tokens_and_refuses_other_layouts(tmp_path: Path) -> None:
    assert list(read_tokens(slot_file(tmp_path / "a.bin", [5, 6, 7]))) == [5, 6, 7]
    (tmp_path / "b.bin").write_bytes(struct.pack("<III", MAGIC, 3, 0))
    with pytest.raises(UnreadableSlotFile, match="version 3"):
        read_tokens(tmp_path / "b.bin")
    (tmp_path / "c.bin").write_bytes(struct.pack("<III", MAGIC, 4, 5) + array("i", [0, 0, 9, 9, 9]).tobytes())
    with pytest.raises(UnreadableSlotFile, match="layout"):
        read_tokens(tmp_path / "c.bin")


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix(array("i", CONVERSATION), [*CONVERSATION[:-1], 0]) == len(CONVERSATION) - 1


def test_the_longest_shared_start_that_fits_is_matched(tmp_path: Path, model_file: Path) -> None:
    prompts = store(tmp_path)
    short = prompts.add("m", source(model_file), slot_file(prompts.new_path("m"), CONVERSATION[:MIN_TOKENS]))
    long = prompts.add("m", source(model_file), slot_file(prompts.new_path("m"), CONVERSATION))
    request = [*CONVERSATION, 1, 2, 3]
    assert prompts.match("m", source(model_file), request, room=10_000) == (long, len(CONVERSATION))
    # The longer one would take more of the engine's cache than the request reserves:
    assert prompts.match("m", source(model_file), request, room=MIN_TOKENS + 10) == (short, MIN_TOKENS)
    # Too little shared: nothing.
    assert prompts.match("m", source(model_file), CONVERSATION[: MIN_TOKENS - 1], room=10_000) is None
    assert prompts.match("other", source(model_file), request, room=10_000) is None


def test_other_cache_types_do_not_match(tmp_path: Path, model_file: Path, caplog) -> None:
    prompts = store(tmp_path)
    prompts.add("m", source(model_file), slot_file(prompts.new_path("m"), CONVERSATION))
    with caplog.at_level(logging.INFO, logger="gateway.prompt_cache"):
        assert prompts.match("m", source(model_file, k="q8_0"), CONVERSATION, room=10_000) is None
    assert "saved with KV cache types f16/f16, this engine runs q8_0/f16" in caplog.text
    assert prompts.waiting("m", set())  # kept for the variants that run f16


def test_the_engine_args_that_change_the_kv_cache_are_part_of_its_identity(model_file: Path) -> None:
    rope = ("--rope-scaling", "linear", "--rope-scale", "4")
    neutral = ("-t", "2", "--threads_batch", "2", "-np", "3", "-kvu", "--metrics", "-a", "x", "-lv", "4")
    assert kv_args(("-m", "f.gguf", *neutral, *rope, "-ctk", "q8_0")) == rope
    model = llama_cpp_model(model_file, (), neutral, rope, args=("-m", str(model_file), "-t", "1"))
    plain, harmless, scaled = (Source.of(model, variant) for variant in model.variants)
    assert plain == harmless != scaled
    assert plain is not None and scaled is not None and plain.args == () and scaled.args == rope


def test_a_split_kv_cache_is_part_of_the_identity(model_file: Path) -> None:
    """llama.cpp restores a slot only into an engine with as many KV streams ("n_stream
    mismatch"): one for a unified cache, one per slot for -np N without --kv-unified."""
    model = llama_cpp_model(model_file)
    variant = model.variants[0]
    streams = [
        Source.of(model, replace(variant, slots=slots, kv_unified=unified)).kv_streams  # type: ignore[union-attr]
        for slots, unified in ((None, False), (1, False), (4, True), (2, False))
    ]
    assert streams == [1, 1, 1, 2]


def test_other_engine_args_or_kv_streams_do_not_match(tmp_path: Path, model_file: Path, caplog) -> None:
    prompts = store(tmp_path)
    prompts.add("m", source(model_file), slot_file(prompts.new_path("m"), CONVERSATION))
    scaled = replace(source(model_file), args=("--rope-scale", "4"))
    split = replace(source(model_file), kv_streams=2)
    with caplog.at_level(logging.INFO, logger="gateway.prompt_cache"):
        assert prompts.match("m", scaled, CONVERSATION, room=10_000) is None
        assert prompts.match("m", split, CONVERSATION, room=10_000) is None
    assert 'saved with engine args "", this engine runs "--rope-scale 4"' in caplog.text
    assert "saved from 1 KV cache stream(s), this engine has 2" in caplog.text
    assert prompts.match("m", source(model_file), CONVERSATION, room=10_000) is not None


def test_a_changed_model_file_drops_its_files(tmp_path: Path, model_file: Path) -> None:
    prompts = store(tmp_path)
    saved = prompts.add("m", source(model_file), slot_file(prompts.new_path("m"), CONVERSATION))
    model_file.write_bytes(b"GGUF" + b"\1" * 100)  # another file under the same name
    assert prompts.match("m", source(model_file), CONVERSATION, room=10_000) is None
    assert not saved.path.exists() and not prompts.waiting("m", set())


def test_the_same_tokens_saved_again_replace_the_older_file(tmp_path: Path, model_file: Path) -> None:
    prompts = store(tmp_path)
    first = prompts.add("m", source(model_file), slot_file(prompts.new_path("m"), CONVERSATION))
    second = prompts.add("m", source(model_file), slot_file(prompts.new_path("m"), CONVERSATION))
    assert prompts.saved == [second] and not first.path.exists()


def test_files_over_max_size_go_least_recently_used_first(tmp_path: Path, model_file: Path) -> None:
    one_file = slot_file(tmp_path / "probe.bin", CONVERSATION, 4096).stat().st_size
    prompts = store(tmp_path, max_size=2 * one_file + 10)

    def add(n: int):
        return prompts.add(
            "m", source(model_file), slot_file(prompts.new_path("m"), [n, *CONVERSATION], 4096)
        )

    first, second = add(0), add(1)
    first.last_used, second.last_used = 2.0, 1.0  # the first was used again since
    third = add(2)
    assert [s.path.exists() for s in (first, second, third)] == [True, False, True]


def test_a_folder_is_read_back_and_broken_entries_are_skipped(
    tmp_path: Path, model_file: Path, caplog
) -> None:
    prompts = store(tmp_path)
    kept = prompts.add("m", source(model_file), slot_file(prompts.new_path("m"), CONVERSATION))
    broken = prompts.add("m", source(model_file), slot_file(prompts.new_path("m"), [7, *CONVERSATION]))
    broken.path.write_bytes(b"nonsense")
    (tmp_path / "cache" / "stray.json").write_text(json.dumps({"model": "m"}))
    again = store(tmp_path)
    assert [s.path for s in again.saved] == [kept.path]
    assert "is not used" in caplog.text


def test_an_owned_folder_is_removed_at_close(tmp_path: Path) -> None:
    prompts = PromptStore(PromptCache(None, 1 << 20))
    assert prompts.folder.is_dir()
    prompts.close()
    assert not prompts.folder.exists()


async def test_a_short_prompt_or_an_engine_that_took_everything_is_not_tokenized(
    tmp_path: Path, model_file: Path
) -> None:
    """Tokenizing costs two calls to the engine before the first token: only a request
    that may continue a saved prompt the engine has not taken pays them."""

    class NoCalls:
        async def post_json(self, path: str, body: object) -> object:
            raise AssertionError(f"the engine was asked: {path}")

    prompts = store(tmp_path)
    saved = prompts.add("m", source(model_file), slot_file(prompts.new_path("m"), CONVERSATION))
    keeper = PromptKeeper(prompts, Metrics())
    model = llama_cpp_model(model_file)
    engine: Any = NoCalls()
    assert (
        await keeper.restore_for(engine, model, model.variants[0], "chat", {}, 0, MIN_TOKENS - 1, set())
        is None
    )
    assert (
        await keeper.restore_for(engine, model, model.variants[0], "chat", {}, 0, None, {saved.path.name})
        is None
    )


@pytest.mark.parametrize(("second", "kept"), [(len(CONVERSATION), True), (REFUSED, False)])
async def test_a_refused_restore_is_tried_once_more_after_erasing_the_idle_slots(
    tmp_path: Path, model_file: Path, second: Exception | int, kept: bool
) -> None:
    """llama-server refuses a file for a cache without room as for a damaged one: only a
    second refusal, with the idle slots erased, tells the file is bad."""
    prompts, metrics = store(tmp_path), Metrics()
    saved = prompts.add("m", source(model_file), slot_file(prompts.new_path("m"), CONVERSATION))
    engine = FakeEngine(prompts.folder, restores=(REFUSED, second))
    slot = await restore(PromptKeeper(prompts, metrics), engine, model_file, [*CONVERSATION, 1])
    assert engine.calls.count("/slots/0?action=erase") == 1
    assert engine.calls.count("/slots/0?action=restore") == 2
    assert (slot == 0) is kept and saved.path.exists() is kept and (saved in prompts.saved) is kept
    assert counted(metrics, "prompt_cache_restores", "failed") == (0 if kept else 1)


def raises(error: Exception) -> Callable[..., Any]:
    def fail(*args: object, **kwargs: object) -> Any:
        raise error

    return fail


def unlink_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every removal fails, as in a folder made read-only (chmod does not stop root)."""
    monkeypatch.setattr(Path, "unlink", raises(PermissionError(13, "Permission denied")))


def test_a_file_that_cannot_be_removed_is_logged_and_forgotten(
    tmp_path: Path, model_file: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    prompts = store(tmp_path)
    saved = prompts.add("m", source(model_file), slot_file(prompts.new_path("m"), CONVERSATION))
    unlink_fails(monkeypatch)
    prompts.forget(saved, "a test")
    assert saved not in prompts.saved
    assert "Permission denied" in caplog.text


@pytest.mark.parametrize("save_error", [None, REFUSED])
async def test_a_save_in_a_folder_where_nothing_can_be_removed_does_not_fail_the_stop(
    tmp_path: Path, model_file: Path, monkeypatch: pytest.MonkeyPatch, save_error: Exception | None
) -> None:
    """A failed save removes what it wrote; when that fails too the stop goes on (it was
    cut short, and the engine SIGKILLed with its other slots unsaved)."""
    prompts, metrics = store(tmp_path), Metrics()
    monkeypatch.setattr(PromptStore, "add", raises(OSError(28, "No space left on device")))
    unlink_fails(monkeypatch)
    model = llama_cpp_model(model_file)
    client: Any = FakeEngine(prompts.folder, save_error=save_error)
    await PromptKeeper(prompts, metrics).save_all(client, model, model.variants[0])
    assert counted(metrics, "prompt_cache_saves", "failed") == 1


async def test_a_directory_where_a_file_was_costs_the_request_nothing(
    tmp_path: Path, model_file: Path, caplog
) -> None:
    prompts, metrics = store(tmp_path), Metrics()
    saved = prompts.add("m", source(model_file), slot_file(prompts.new_path("m"), CONVERSATION))
    saved.path.unlink()
    saved.path.mkdir()  # llama-server cannot read it, and it cannot be unlinked
    engine = FakeEngine(prompts.folder, restores=(REFUSED, REFUSED))
    assert await restore(PromptKeeper(prompts, metrics), engine, model_file, [*CONVERSATION, 1]) is None
    assert saved not in prompts.saved and counted(metrics, "prompt_cache_restores", "failed") == 1
    assert "Is a directory" in caplog.text


def test_a_file_whose_meta_cannot_be_written_is_not_kept(
    tmp_path: Path, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk: the .json is not written, so the pair is removed, not indexed (the
    entry would outlive its .bin and fail its restore)."""
    prompts = store(tmp_path)
    older = prompts.add("m", source(model_file), slot_file(prompts.new_path("m"), CONVERSATION))
    monkeypatch.setattr(Path, "write_text", raises(OSError(28, "No space left on device")))
    path = slot_file(prompts.new_path("m"), CONVERSATION)
    with pytest.raises(OSError, match="No space left"):
        prompts.add("m", source(model_file), path)
    assert prompts.saved == [older] and older.path.exists()
    assert not path.exists() and not path.with_suffix(".json").exists()


async def test_a_slot_larger_than_max_size_is_skipped_as_too_large(
    tmp_path: Path, model_file: Path, caplog
) -> None:
    """Not counted as saved, and it does not push the smaller files out on its way."""
    small = slot_file(tmp_path / "probe.bin", CONVERSATION).stat().st_size
    prompts, metrics = store(tmp_path, max_size=small + 100), Metrics()
    kept = prompts.add("m", source(model_file), slot_file(prompts.new_path("m"), CONVERSATION))
    model = llama_cpp_model(model_file)
    client: Any = FakeEngine(prompts.folder, tokens=[7, *CONVERSATION], state_bytes=1 << 20)
    await PromptKeeper(prompts, metrics).save_all(client, model, model.variants[0])
    assert counted(metrics, "prompt_cache_saves", "too_large") == 1
    assert counted(metrics, "prompt_cache_saves", "saved") == 0
    assert "larger than max_size" in caplog.text
    assert prompts.saved == [kept]
    assert sorted(prompts.folder.iterdir()) == sorted([kept.path, kept.path.with_suffix(".json")])


@pytest.mark.parametrize("odd", [2**31, 2**40, -(2**31) - 1])
async def test_token_ids_no_slot_file_can_hold_match_nothing(
    tmp_path: Path, model_file: Path, odd: int
) -> None:
    """A completion's token ids beyond 32 bits (the engine refuses them itself): no 500."""
    prompts = store(tmp_path)
    prompts.add("m", source(model_file), slot_file(prompts.new_path("m"), [65] * 300))
    engine = FakeEngine(prompts.folder)
    assert await restore(PromptKeeper(prompts, Metrics()), engine, model_file, [65] * 300 + [odd]) is None
    assert engine.calls == []


class BusyEngine(FakeEngine):
    """A save waits behind the batch the engine decodes (a long prompt's takes seconds)."""

    async def post_json(self, path: str, body: dict[str, Any]) -> Any:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_the_saves_of_a_stop_end_within_their_budget(tmp_path: Path, model_file: Path, caplog) -> None:
    prompts, metrics = store(tmp_path), Metrics()
    model = llama_cpp_model(model_file)
    client: Any = BusyEngine(prompts.folder)
    await asyncio.wait_for(PromptKeeper(prompts, metrics).save_all(client, model, model.variants[0], 0.05), 5)
    assert "took over 0.05s: the rest is skipped" in caplog.text
    assert prompts.saved == [] and list(prompts.folder.iterdir()) == []
