"""LlamaCppEngine: what is particular to llama.cpp's llama-server.

Its command line, how it reports its port and context, how it counts tokens, and how
it says a prompt did not fit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from gateway.config.schema import EngineKind, Model, Variant
from gateway.engine.adapter import EngineAdapter, Launch, RunningRoom, StartFailed
from gateway.engine.binary import BinaryNotFound, find_llama_server
from gateway.engine.client import EngineClient, EngineRequestError
from gateway.engine.counting import LlamaCppCounter, TokenCounter
from gateway.models import Room

# Slots llama-server runs when `-np` is not given (b11434: "auto" is 4, on one unified cache).
AUTO_SLOTS = 4
LISTENING_PATTERN = r"listening on http://127\.0\.0\.1:(\d+)"
# Seconds an erase of an idle slot may take (it takes milliseconds) before the slot is
# taken to have become busy meanwhile (llama-server then defers the erase).
ERASE_WAIT = 0.5


class LlamaCppEngine(EngineAdapter):
    """The llama.cpp engine type."""

    kind = EngineKind.LLAMA_CPP
    spare_connection = True  # its HTTP threads are at least its slots + 2

    # What the arguments say was parsed and checked at load (gateway/engine/llamacpp.lua):
    # these read the variant's typed fields, never the argument strings.

    def launch(self, model: Model, variant: Variant, slot_dir: str) -> Launch:
        try:
            binary = find_llama_server(variant.binary or model.binary)
        except BinaryNotFound as exc:
            raise StartFailed("spawn", str(exc)) from None
        return Launch(self.argv(binary, model, variant, slot_dir), model.env, None, LISTENING_PATTERN)

    def argv(self, binary: str, model: Model, variant: Variant, slot_dir: str) -> list[str]:
        # The config refuses -c, --host and --port in args: the gateway sets them, and
        # --alias unless the args name one, and a slot folder (which the slot actions the
        # gateway uses need) unless the args name one.
        args = [*model.args, *variant.args]
        alias = [] if variant.alias else ["--alias", model.name]
        slots = [] if "--slot-save-path" in args else ["--slot-save-path", slot_dir]
        # Port 0: the engine binds a free port itself and logs it; no race with others.
        where = ["--host", "127.0.0.1", "--port", "0"]
        return [binary, *args, "--ctx-size", str(variant.context), *alias, *slots, *where]

    def capacity(self, variant: Variant, model: Model) -> Room:
        """The room a variant gives requests, predicted from its arguments before a start.

        An explicit `-np N` without a unified KV cache splits the context per slot.
        """
        split = self._split_slots(variant)
        if split:
            return Room(variant.context // split, None, split)
        return Room(variant.context, variant.context, variant.slots or AUTO_SLOTS)

    def shared_kv_budget(self, variant: Variant, model: Model, slot_context: int) -> int | None:
        """Tokens all slots share, or None when each slot has a cache of its own.

        By default llama-server runs several slots on one unified KV cache of n_ctx
        tokens: concurrent requests together must fit it, or the engine fails them with
        "Context size has been exceeded". An explicit `-np N` without `--kv-unified`
        gives each slot its own n_ctx / N instead.
        """
        return None if self._split_slots(variant) else slot_context

    @staticmethod
    def _split_slots(variant: Variant) -> int | None:
        """N when the context is split into N per-slot caches (`-np N`, N > 1, without
        `--kv-unified`), else None."""
        if variant.slots is not None and variant.slots > 1 and not variant.kv_unified:
            return variant.slots
        return None

    def serves(self, model: Model, variant: Variant, kind: str, path: str) -> str | None:
        if kind == "embedding" and not variant.embeddings:
            return f"model {model.name!r} is not started with --embeddings, so it serves no embeddings"
        if kind == "rerank" and not variant.reranking:
            return f"model {model.name!r} is not started with --reranking, so it serves no rerank"
        return None

    def counter(self, model: Model) -> TokenCounter:
        return COUNTER

    async def running_room(self, client: EngineClient, model: Model, variant: Variant) -> RunningRoom:
        """The context one request really gets and the number of slots, as the running
        engine reports them."""
        slot_context, slots = await self._slots(client)
        kv_budget = self.shared_kv_budget(variant, model, slot_context)
        # On a shared cache no more sequences go at once than it has slots: one waiting
        # inside the engine would take room the gateway does not see.
        return RunningRoom(slot_context, slots, kv_budget, slots if kv_budget is not None else None)

    async def _slots(self, client: EngineClient) -> tuple[int, int]:
        try:
            slots = await client.get_json("/slots")
            if isinstance(slots, list) and slots:
                return min(int(slot["n_ctx"]) for slot in slots), len(slots)
        except (EngineRequestError, KeyError, TypeError, ValueError):
            pass  # /slots can be disabled (--no-slots); /props always answers
        props = await client.get_json("/props")
        return int(props["default_generation_settings"]["n_ctx"]), int(props["total_slots"])

    async def clear_idle_slots(self, client: EngineClient) -> None:
        """Erase what idle slots keep: cells of finished requests, which a unified cache
        holds until a new prompt is processed in that slot. (llama-server also gives the
        extra answers of an `n > 1` request idle slots without clearing them, and then
        fails the batch, "Invalid input batch", even mid-stream.)

        A slot idle when /slots was read may have taken a request since; llama-server
        defers its erase until that request ends, which is not waited for."""
        idle = [int(slot["id"]) for slot in await client.get_json("/slots") if not slot.get("is_processing")]

        async def erase(slot: int) -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(client.post_json(f"/slots/{slot}?action=erase", {}), ERASE_WAIT)

        await asyncio.gather(*(erase(slot) for slot in idle))

    async def busy_tasks(self, client: EngineClient) -> frozenset[int]:
        """The ids of the tasks its slots are processing now."""
        slots = await client.get_json("/slots")
        return frozenset(int(slot["id_task"]) for slot in slots if slot.get("is_processing"))

    def context_overflow(self, status: int, body: bytes) -> int | None:
        return llama_cpp_overflow(status, body)


COUNTER = LlamaCppCounter()


def llama_cpp_overflow(status: int, body: bytes) -> int | None:
    """The prompt's token count from llama-server's refusal of a prompt too long for its
    context (`exceed_context_size_error`), else None."""
    if status != 400 or b"exceed_context_size_error" not in body:
        return None
    try:
        return int(json.loads(body)["error"]["n_prompt_tokens"])
    except (ValueError, KeyError, TypeError):
        return None
