"""OpenAIEngine: any OpenAI-compatible server the gateway starts from a command line.

vLLM, SGLang, TabbyAPI, koboldcpp, llama-cpp-python's server, or llama-server itself:
the gateway picks a free loopback port, substitutes it (and the host, the variant's
context, the model's name) into the model's `command`, waits for its `health` path to
answer 200, and counts tokens the way `count` names, if any.
"""

from __future__ import annotations

import re
import socket
from typing import Any

from gateway.config.schema import EngineKind, Model, Upstream, Variant
from gateway.engine.adapter import EngineAdapter, Launch, RunningRoom
from gateway.engine.client import EngineClient
from gateway.engine.counting import COUNTERS, TokenCounter
from gateway.engine.llamacpp import llama_cpp_overflow
from gateway.models import Room

HOST = "127.0.0.1"
# llama.cpp's own endpoints and Anthropic's, which OpenAI-compatible servers need not serve.
NOT_OPENAI = frozenset({"/v1/messages", "/v1/messages/count_tokens", "/v1/rerank", "/v1/reranking"})
_PLACEHOLDER = re.compile(r"\$\{(PORT|HOST|CONTEXT|MODEL)\}")
# How servers word a prompt too long for their context, besides llama.cpp: vLLM's
# "(P in the messages, C in the completion)" or "has P input tokens", OpenAI's "your
# messages resulted in P tokens".
_OVERFLOW_COUNTS = (
    re.compile(r"(\d+) in the (?:messages|prompt)"),
    re.compile(r"has (\d+) input tokens"),
    re.compile(r"resulted in (\d+) tokens"),
)


def upstream(model: Model) -> Upstream:
    assert model.upstream is not None, f"{model.name} has no upstream"  # set for these types at load
    return model.upstream


def free_port() -> int:
    """A loopback port free now. (Another process may take it before the engine binds
    it: the start then fails, and is tried again with another port.)"""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


class OpenAIEngine(EngineAdapter):
    """The openai engine type: a started server that speaks OpenAI's API."""

    kind = EngineKind.OPENAI

    def launch(self, model: Model, variant: Variant, slot_dir: str) -> Launch | None:
        port = free_port()
        values = {"PORT": str(port), "HOST": HOST, "CONTEXT": str(variant.context), "MODEL": model.name}
        argv = [*upstream(model).command, *model.args, *variant.args]
        return Launch([_PLACEHOLDER.sub(lambda m: values[m.group(1)], a) for a in argv], model.env, port)

    def health_path(self, model: Model) -> str:
        return upstream(model).health

    def capacity(self, variant: Variant, model: Model) -> Room:
        return Room(variant.context, None, upstream(model).max_in_flight or 1)

    async def running_room(self, client: EngineClient, model: Model, variant: Variant) -> RunningRoom:
        cap = upstream(model).max_in_flight
        return RunningRoom(self.capacity(variant, model).slot_context, cap or 1, None, cap)

    def unserved(self, model: Model, path: str) -> str | None:
        if path in NOT_OPENAI:
            return (
                f"model {model.name!r} runs on an engine of type {self.kind.value!r}, which serves "
                f"OpenAI's API (chat completions, completions, embeddings, responses), not {path}"
            )
        return None

    def rewrite(self, model: Model, body: dict[str, Any]) -> dict[str, Any]:
        """The engine knows the model by its served name only (every variant's)."""
        name = model.variants[0].served_name
        return body if body.get("model") == name else {**body, "model": name}

    def counter(self, model: Model) -> TokenCounter | None:
        return COUNTERS[upstream(model).count]

    def context_overflow(self, status: int, body: bytes) -> int | None:
        if status != 400:
            return None
        if b"exceed_context_size_error" in body:
            return llama_cpp_overflow(status, body)
        if b"maximum context length" not in body and b"context_length_exceeded" not in body:
            return None
        text = body.decode("utf-8", "replace")
        found = (pattern.search(text) for pattern in _OVERFLOW_COUNTS)
        return next((int(match.group(1)) for match in found if match), None)
