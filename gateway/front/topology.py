"""Which gateway serves which model name, and the HAProxy backends that follow. Pure."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

# HAProxy proxy and server names may hold these characters only.
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._:-]")


@dataclass(frozen=True)
class Served:
    """One name a gateway answers to, as its /v1/models lists it."""

    name: str
    model: str  # the model it names there: itself, or the model it is an alias of
    entry: dict[str, Any] = field(compare=False)  # its /v1/models object


@dataclass(frozen=True)
class Gateway:
    url: str  # http://host:port, as given
    host: str
    port: int
    names: tuple[Served, ...]
    maxconn: int  # connections HAProxy opens to it at once per backend: its queue_limit
    shutdown_delay: float | None = None  # seconds it keeps serving after SIGTERM; None: unknown

    @property
    def address(self) -> str:
        """host:port as HAProxy reads it (an IPv6 host in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def server_name(self) -> str:
        return _UNSAFE_NAME_CHARS.sub("_", f"{self.host}:{self.port}")


@dataclass(frozen=True)
class Backend:
    """The gateways that answer to some model names: one model, or its aliases."""

    name: str  # the HAProxy backend's name
    names: tuple[str, ...]  # the model names routed here, in the order first listed
    gateways: tuple[Gateway, ...]


def backends(gateways: list[Gateway]) -> list[Backend]:
    """One backend per model and set of gateways: a model's aliases share its backend
    where the same gateways answer to them (an alias only some gateways know goes to
    those alone)."""
    serving: dict[str, list[Gateway]] = {}
    model_of: dict[str, str] = {}  # name -> the model it names on the first gateway listing it
    for gateway in gateways:
        for served in gateway.names:
            serving.setdefault(served.name, []).append(gateway)
            model_of.setdefault(served.name, served.model)
    groups: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for name, found in serving.items():
        groups.setdefault((model_of[name], tuple(g.url for g in found)), []).append(name)
    taken: set[str] = set()
    result = []
    for (model, _), names in groups.items():
        label = _unique(f"model_{_UNSAFE_NAME_CHARS.sub('_', model if model in names else names[0])}", taken)
        result.append(Backend(label, tuple(names), tuple(serving[names[0]])))
    return result


def _unique(name: str, taken: set[str]) -> str:
    """`name`, or with a number added where an earlier backend took it."""
    candidate, number = name, 1
    while candidate in taken:
        number += 1
        candidate = f"{name}_{number}"
    taken.add(candidate)
    return candidate


def merged_models(gateways: list[Gateway]) -> dict[str, Any]:
    """GET /v1/models for the whole front: every name once. Where several gateways serve
    a name, the entry with the smallest context_length: what any of them can serve."""
    chosen: dict[str, dict[str, Any]] = {}
    for gateway in gateways:
        for served in gateway.names:
            known = chosen.get(served.name)
            if known is None or _context(served.entry) < _context(known):
                chosen[served.name] = served.entry
    return {"object": "list", "data": list(chosen.values())}


def contexts(route: Backend) -> dict[str, float]:
    """The context_length each of a backend's gateways lists for its model (where one does)."""
    found = {}
    for gateway in route.gateways:
        entry = next(s.entry for s in gateway.names if s.name == route.names[0])
        if (value := _context(entry)) != math.inf:
            found[gateway.url] = value
    return found


def _context(entry: dict[str, Any]) -> float:
    value = entry.get("context_length")
    return value if isinstance(value, int | float) and not isinstance(value, bool) else math.inf
