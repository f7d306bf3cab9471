"""Talking to engines: processes, HTTP, and an adapter per engine type."""

from gateway.engine.adapter import EngineAdapter, StartFailed
from gateway.engine.client import EngineClient
from gateway.engine.llamacpp import LlamaCppEngine
from gateway.engine.manager import EngineInstance, EngineManager
from gateway.engine.openai import OpenAIEngine
from gateway.engine.process import EngineProcess
from gateway.engine.remote import RemoteEngine

__all__ = [
    "EngineAdapter",
    "EngineClient",
    "EngineInstance",
    "EngineManager",
    "EngineProcess",
    "LlamaCppEngine",
    "OpenAIEngine",
    "RemoteEngine",
    "StartFailed",
]
