"""Writes haproxy.cfg, the worked example, as `llm-gateway front` would for three boxes:

    python contrib/haproxy/example.py > contrib/haproxy/haproxy.cfg

gpu-a and gpu-b both serve llama-3.3-70b (alias llama), gpu-a and gpu-c a coder model;
gpu-b also serves embeddings, gpu-c a second chat model. The boxes do not exist: this
script describes what their /v1/models and /gateway/models would answer.
"""

from __future__ import annotations

import sys
from typing import Any

from gateway.front.haproxy import FrontSettings, render
from gateway.front.topology import Gateway, Served

COMMAND = (
    "llm-gateway front --gateway http://gpu-a:7777 --gateway http://gpu-b:7777 "
    "--gateway http://gpu-c:7777 --listen 0.0.0.0:8080 --sticky X-Session-Id"
)
SETTINGS = FrontSettings(listen=(("0.0.0.0", 8080),), sticky="X-Session-Id")


def entry(name: str, context: int, alias_of: str | None = None) -> dict[str, Any]:
    """A name as a gateway's /v1/models lists it."""
    meta = {"n_ctx": context, "variants": [context], "alias_of": alias_of}
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "llm-gateway",
        "context_length": context,
        "meta": meta,
    }


def box(host: str, *models: tuple[str, int, tuple[str, ...]]) -> Gateway:
    served = []
    for name, context, aliases in models:
        served.append(Served(name, name, entry(name, context)))
        served += [Served(alias, name, entry(alias, context, name)) for alias in aliases]
    return Gateway(f"http://{host}:7777", host, 7777, tuple(served), maxconn=256, shutdown_delay=2.0)


GATEWAYS = [
    box("gpu-a", ("llama-3.3-70b", 32768, ("llama",)), ("qwen2.5-coder-32b", 32768, ())),
    box("gpu-b", ("llama-3.3-70b", 32768, ("llama",)), ("bge-m3", 8192, ())),
    box("gpu-c", ("qwen2.5-coder-32b", 32768, ()), ("gemma-3-27b", 65536, ())),
]


def example() -> str:
    return render(GATEWAYS, SETTINGS, COMMAND)


if __name__ == "__main__":
    sys.stdout.write(example())
