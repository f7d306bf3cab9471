"""Talking to engines: processes, HTTP, and what is particular to llama.cpp."""

from gateway.engine.client import EngineClient
from gateway.engine.llamacpp import LlamaCppEngine
from gateway.engine.manager import EngineInstance, EngineManager, StartFailed
from gateway.engine.process import EngineProcess

__all__ = [
    "EngineClient",
    "EngineInstance",
    "EngineManager",
    "EngineProcess",
    "LlamaCppEngine",
    "StartFailed",
]
