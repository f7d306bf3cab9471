"""LlamaCppEngine: what is particular to llama.cpp's llama-server.

Its command line, how it reports its port and context, how it counts tokens, and how
it says a prompt did not fit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any

from gateway.config.schema import Model, Variant
from gateway.engine.client import EngineClient, EngineRequestError
from gateway.models import Room

# Slots llama-server runs when `-np` is not given (b11434: "auto" is 4, on one unified cache).
AUTO_SLOTS = 4
LISTENING_PATTERN = r"listening on http://127\.0\.0\.1:(\d+)"
# Seconds an erase of an idle slot may take (it takes milliseconds) before the slot is
# taken to have become busy meanwhile (llama-server then defers the erase).
ERASE_WAIT = 0.5


@dataclass(frozen=True)
class TemplateOverhead:
    """Tokens a chat template adds: fixed, and per message (measured on the engine)."""

    fixed: int
    per_message: int

    def upper_bound(self, text_bytes: int, messages: int) -> int:
        # Byte-level tokenizers never emit more tokens than bytes; one more per message
        # covers SentencePiece's leading-space marker.
        return self.fixed + messages * (self.per_message + 1) + text_bytes


class LlamaCppEngine:
    """The llama.cpp engine type."""

    name = "llama.cpp"
    listening_pattern = LISTENING_PATTERN

    # What the arguments say was parsed and checked at load (gateway/engine/llamacpp.lua):
    # these read the variant's typed fields, never the argument strings.

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

    def served_name(self, model: Model, variant: Variant) -> str:
        """The `model` the engine writes into its responses."""
        return variant.served_name

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

    def serves(self, model: Model, variant: Variant, kind: str) -> str | None:
        """Why this engine cannot serve a request kind, or None when it can."""
        if kind == "embedding" and not variant.embeddings:
            return f"model {model.name!r} is not started with --embeddings, so it serves no embeddings"
        if kind == "rerank" and not variant.reranking:
            return f"model {model.name!r} is not started with --reranking, so it serves no rerank"
        return None

    async def slots(self, client: EngineClient) -> tuple[int, int]:
        """The context one request really gets and the number of slots, as the running
        engine reports them."""
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

    async def template_overhead(self, client: EngineClient) -> TemplateOverhead:
        """Measure the chat template's own tokens with empty messages.

        Templates refuse some role orders, so a user/assistant pair is added; charging
        the pair's overhead to every message keeps the bound an upper bound.
        """
        one = await self._count_chat(client, {"messages": _probe(["user"])})
        three = await self._count_chat(client, {"messages": _probe(["user", "assistant", "user"])})
        per_message = max(0, three - one)
        return TemplateOverhead(fixed=max(0, one - per_message), per_message=per_message)

    async def count(self, client: EngineClient, kind: str, body: dict[str, Any]) -> int:
        """Exact prompt tokens of a request; for several prompts, the largest."""
        if kind == "chat":
            return await self._count_chat(client, body)
        prompts = body.get("prompt") if kind == "completion" else body.get("input")
        return max([await self._count_prompt(client, p) for p in _prompt_list(prompts)], default=0)

    async def _count_chat(self, client: EngineClient, body: dict[str, Any]) -> int:
        templated = await client.post_json("/apply-template", body)
        return await self._count_text(client, templated["prompt"])

    async def _count_prompt(self, client: EngineClient, prompt: Any) -> int:
        if isinstance(prompt, str):
            return await self._count_text(client, prompt)
        return len(prompt)  # token ids (or a mixed list) are counted as given

    async def _count_text(self, client: EngineClient, text: str) -> int:
        result = await client.post_json(
            "/tokenize", {"content": text, "add_special": True, "parse_special": True}
        )
        return len(result["tokens"])

    def context_overflow(self, status: int, body: bytes) -> int | None:
        """The prompt's token count when the engine refused it as too long, else None."""
        if status != 400 or b"exceed_context_size_error" not in body:
            return None
        try:
            return int(json.loads(body)["error"]["n_prompt_tokens"])
        except (ValueError, KeyError, TypeError):
            return None


def _probe(roles: list[str]) -> list[dict[str, str]]:
    return [{"role": role, "content": ""} for role in roles]


def _prompt_list(prompts: Any) -> list[Any]:
    """A prompt field as a list of prompts: a string, ids, or a list of either."""
    if isinstance(prompts, str) or (
        isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)
    ):
        return [prompts]
    return list(prompts) if isinstance(prompts, list) else []
