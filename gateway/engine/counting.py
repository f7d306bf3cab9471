"""Exact token counting on the engine: one counter per way engines offer it.

A counter renders nothing itself: the engine that will run the prompt counts it, with
its own tokenizer and chat template. `count` gives the largest count of a request's
prompts (several prompts run as several sequences, each needing room for itself).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from gateway.config.schema import CountMethod
from gateway.engine.client import EngineClient


@dataclass(frozen=True)
class TemplateOverhead:
    """Tokens a chat template adds: fixed, and per message (measured on the engine)."""

    fixed: int
    per_message: int

    def upper_bound(self, text_bytes: int, messages: int) -> int:
        # Byte-level tokenizers never emit more tokens than bytes; one more per message
        # covers SentencePiece's leading-space marker.
        return self.fixed + messages * (self.per_message + 1) + text_bytes


class TokenCounter(ABC):
    """Counts prompts on one engine's API."""

    async def count(self, client: EngineClient, kind: str, body: dict[str, Any]) -> int:
        """Exact prompt tokens of a request; for several prompts, the largest."""
        if kind == "chat":
            return await self.count_chat(client, body)
        prompts = body.get("prompt") if kind == "completion" else body.get("input")
        counts = [await self._count_prompt(client, body, p) for p in prompt_list(prompts)]
        return max(counts, default=0)

    async def template_overhead(self, client: EngineClient, body: dict[str, Any]) -> TemplateOverhead:
        """Measure the chat template's own tokens with empty messages (`body` carries the
        fields the engine wants besides them, e.g. its model name).

        Templates refuse some role orders, so a user/assistant pair is added; charging
        the pair's overhead to every message keeps the bound an upper bound.
        """
        one = await self.count_chat(client, {**body, "messages": _probe(["user"])})
        three = await self.count_chat(client, {**body, "messages": _probe(["user", "assistant", "user"])})
        per_message = max(0, three - one)
        return TemplateOverhead(fixed=max(0, one - per_message), per_message=per_message)

    @abstractmethod
    async def count_chat(self, client: EngineClient, body: dict[str, Any]) -> int:
        """The tokens of a chat request's prompt as its template renders it."""

    @abstractmethod
    async def count_text(self, client: EngineClient, body: dict[str, Any], text: str) -> int:
        """The tokens of a plain prompt."""

    async def _count_prompt(self, client: EngineClient, body: dict[str, Any], prompt: Any) -> int:
        if isinstance(prompt, str):
            return await self.count_text(client, body, prompt)
        return len(prompt)  # token ids (or a mixed list) are counted as given


class LlamaCppCounter(TokenCounter):
    """llama-server: POST /apply-template renders a chat, POST /tokenize counts text."""

    async def count_chat(self, client: EngineClient, body: dict[str, Any]) -> int:
        templated = await client.post_json("/apply-template", body)
        return await self.count_text(client, body, templated["prompt"])

    async def count_text(self, client: EngineClient, body: dict[str, Any], text: str) -> int:
        return len(await self._tokenize(client, text))

    async def tokens(self, client: EngineClient, kind: str, body: dict[str, Any]) -> list[int]:
        """The tokens of a request's one prompt as the engine will process it ([] for
        several prompts, or other kinds)."""
        if kind == "chat":
            templated = await client.post_json("/apply-template", body)
            return await self._tokenize(client, templated["prompt"])
        prompts = prompt_list(body.get("prompt")) if kind == "completion" else []
        if len(prompts) != 1:
            return []
        prompt = prompts[0]
        return await self._tokenize(client, prompt) if isinstance(prompt, str) else list(prompt)

    async def _tokenize(self, client: EngineClient, text: str) -> list[int]:
        result = await client.post_json(
            "/tokenize", {"content": text, "add_special": True, "parse_special": True}
        )
        return [int(token) for token in result["tokens"]]


class VllmCounter(TokenCounter):
    """vLLM (and SGLang's compatible route): POST /tokenize with `messages` or `prompt`
    and the model's name; the answer's `count`."""

    async def count_chat(self, client: EngineClient, body: dict[str, Any]) -> int:
        fields: dict[str, Any] = {
            k: body[k] for k in ("model", "messages", "tools", "chat_template_kwargs") if k in body
        }
        result = await client.post_json("/tokenize", {**fields, "add_generation_prompt": True})
        return int(result["count"])

    async def count_text(self, client: EngineClient, body: dict[str, Any], text: str) -> int:
        result = await client.post_json("/tokenize", {"model": body.get("model"), "prompt": text})
        return int(result["count"])


class TabbyCounter(TokenCounter):
    """TabbyAPI: POST /v1/token/encode with `text` (a string, or chat messages its
    template renders); the answer's `length`."""

    async def count_chat(self, client: EngineClient, body: dict[str, Any]) -> int:
        result = await client.post_json("/v1/token/encode", {"text": body.get("messages", [])})
        return int(result["length"])

    async def count_text(self, client: EngineClient, body: dict[str, Any], text: str) -> int:
        result = await client.post_json("/v1/token/encode", {"text": text, "add_bos_token": True})
        return int(result["length"])


COUNTERS: dict[CountMethod, TokenCounter | None] = {
    CountMethod.NONE: None,
    CountMethod.LLAMA_CPP: LlamaCppCounter(),
    CountMethod.VLLM: VllmCounter(),
    CountMethod.TABBY: TabbyCounter(),
}


def _probe(roles: list[str]) -> list[dict[str, str]]:
    return [{"role": role, "content": ""} for role in roles]


def prompt_list(prompts: Any) -> list[Any]:
    """A prompt field as a list of prompts: a string, ids, or a list of either."""
    if isinstance(prompts, str) or (
        isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)
    ):
        return [prompts]
    return list(prompts) if isinstance(prompts, list) else []
