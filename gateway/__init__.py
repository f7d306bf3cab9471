"""llm-gateway: an OpenAI-compatible gateway for local llama.cpp engines."""

__version__ = "0.1.0"
