"""The adapter of each engine type."""

from __future__ import annotations

from gateway.config.schema import EngineKind, Model
from gateway.engine.adapter import EngineAdapter
from gateway.engine.llamacpp import LlamaCppEngine
from gateway.engine.openai import OpenAIEngine
from gateway.engine.remote import RemoteEngine

ADAPTERS: dict[EngineKind, EngineAdapter] = {
    EngineKind.LLAMA_CPP: LlamaCppEngine(),
    EngineKind.OPENAI: OpenAIEngine(),
    EngineKind.REMOTE: RemoteEngine(),
}


def adapter_for(model: Model) -> EngineAdapter:
    return ADAPTERS[model.engine]
