"""The loaded configuration as immutable dataclasses; no other module sees Lua's flattened keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any


class EngineKind(StrEnum):
    """A model's engine type (`engine = ...`): which adapter starts it and talks to it."""

    LLAMA_CPP = "llama.cpp"  # llama.cpp's llama-server, started by the gateway
    OPENAI = "openai"  # any OpenAI-compatible server, started by the gateway from `command`
    REMOTE = "remote"  # an OpenAI-compatible upstream the gateway does not start

    @property
    def local(self) -> bool:
        """It runs on this machine: a process that takes memory and an engine place."""
        return self is not EngineKind.REMOTE


class CountMethod(StrEnum):
    """How an engine counts a prompt's tokens exactly (`count = ...`), if it can."""

    NONE = "none"  # it cannot: selection uses the byte bound and the learned estimate
    LLAMA_CPP = "llama.cpp"  # POST /apply-template, then /tokenize
    VLLM = "vllm"  # POST /tokenize with `messages` or `prompt`; answer `count`
    TABBY = "tabby"  # POST /v1/token/encode; answer `length`


@dataclass(frozen=True)
class Timeouts:
    """Seconds; resolved per variant (server, then model, then variant)."""

    health_check: float
    startup: float
    drain: float
    stop: float
    idle: float  # 0 = never unload


@dataclass(frozen=True)
class RequestRules:
    """How a model's requests are rewritten before they reach its engine."""

    defaults: dict[str, Any] = field(default_factory=dict)  # applied when the client gave none
    force: dict[str, Any] = field(default_factory=dict)  # always applied
    strip: tuple[str, ...] = ()  # removed from every request


@dataclass(frozen=True)
class Upstream:
    """How the gateway reaches an engine of type openai or remote (llama.cpp: None)."""

    health: str = "/health"  # answered 200 when ready
    count: CountMethod = CountMethod.NONE
    served_name: str | None = None  # the `model` the engine expects; None: the model's name
    max_in_flight: int | None = None  # requests sent at once; beyond it they queue here
    command: tuple[str, ...] = ()  # openai: argv with ${PORT}, ${HOST}, ${CONTEXT}, ${MODEL}
    url: str | None = None  # remote: the base the request paths are appended to
    api_key_env: str | None = None  # remote: the variable the upstream's key is read from
    health_interval: float = 5.0  # remote: seconds between probes while it is up


@dataclass(frozen=True)
class Variant:
    """One way to start a model's engine: a context size and its extra arguments."""

    model: str
    context: int
    args: tuple[str, ...]
    binary: str | None
    timeouts: Timeouts
    # What the engine's arguments (the model's, then the variant's) and environment say,
    # parsed and checked once at load by the engine type (gateway/engine/llamacpp.lua).
    slots: int | None = None  # -np N; None: the engine's automatic default
    kv_unified: bool = False  # --kv-unified (the last of it and --no-kv-unified wins)
    alias: str | None = None  # llama.cpp: --alias NAME (one name, no comma); others: served_name
    model_file: str | None = None  # -m/--model, resolved against the config's folder
    embeddings: bool = False  # --embeddings
    reranking: bool = False  # --reranking
    mmproj_file: str | None = None  # -mm/--mmproj, resolved against the config's folder
    cache_type_k: str = "f16"  # -ctk/--cache-type-k (or LLAMA_ARG_CACHE_TYPE_K)
    cache_type_v: str = "f16"  # -ctv/--cache-type-v (or LLAMA_ARG_CACHE_TYPE_V)
    # Bytes the engine takes, declared by the variant or its model (`memory = "6GiB"`);
    # it replaces the estimate (gateway/engine/footprint.py). None: estimated.
    memory: int | None = None
    engine: EngineKind = EngineKind.LLAMA_CPP  # the model's engine type

    @property
    def key(self) -> str:
        return f"{self.model}@{self.context}"

    @property
    def served_name(self) -> str:
        """The `model` the engine expects and writes into its responses: llama.cpp's
        --alias, which the gateway sets to the model's name unless the args set one; an
        openai or remote engine's `served_name` (kept in `alias`), else the model's name."""
        return self.alias or self.model


@dataclass(frozen=True)
class Model:
    name: str
    aliases: tuple[str, ...]
    engine: EngineKind
    binary: str | None
    args: tuple[str, ...]
    env: dict[str, str]
    default_max_tokens: int
    request: RequestRules
    variants: tuple[Variant, ...]  # sorted by context, smallest first
    keep_loaded: bool = False  # once started, never stopped to make room for another engine
    upstream: Upstream | None = None  # engine types openai and remote

    @property
    def largest_context(self) -> int:
        return self.variants[-1].context

    def variant_for(self, context: int) -> Variant | None:
        return next((v for v in self.variants if v.context == context), None)


@dataclass(frozen=True)
class PromptCache:
    """Where saved KV caches of llama.cpp engines go, and how much they may take."""

    dir: str | None  # None: a folder of its own in the system's temporary directory
    max_size: int  # bytes; the least recently used files go first beyond it


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[tuple[str, int], ...]  # (host, port), IPv4 and IPv6
    queue_limit: int
    max_body_bytes: int
    max_start_failures: int
    loading_keepalive: bool
    timeouts: Timeouts
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    admin_key: str | None = None  # when set, /gateway/* control endpoints need it
    preload: tuple[str, int] | None = None  # (model, context) started at start-up
    config_timeout: float = 10.0  # seconds a reload may spend running the config file
    # Seconds between SIGTERM and closing the listening sockets: /health answers 503 and
    # requests are still served, so that a load balancer stops sending first.
    shutdown_delay: float = 2.0
    prompt_cache: PromptCache | None = PromptCache(None, 2 << 30)  # None: off
    max_engines: int = 1  # engines that may run at once
    memory_budget: int | None = None  # bytes all running engines may take; None: no limit
    # How the budget was found: "config", or what "auto" found ("auto: physical memory
    # 23.4 GiB less 10%"); "" without a budget.
    memory_budget_source: str = ""


@dataclass(frozen=True)
class GatewayConfig:
    source: str  # the config file's path
    server: ServerConfig
    models: tuple[Model, ...]

    def resolve(self, name: str) -> Model | None:
        """The model a client's `model` field names, by name or alias."""
        return self._names.get(name)

    @cached_property
    def _names(self) -> dict[str, Model]:
        return {n: m for m in self.models for n in (m.name, *m.aliases)}
