"""The operator's endpoints under /gateway/: state, logs, models, load, unload, reload."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web

from gateway.config import ConfigError, GatewayConfig
from gateway.config.schema import Model, Variant
from gateway.errors import InvalidRequest, ModelNotFound
from gateway.server.body import read_json_object
from gateway.server.sse import SSE_HEADERS, sse_data
from gateway.supervisor.supervisor import Supervisor
from gateway.utils.logger import RecentLines

DEFAULT_LOG_LINES = 200
FOLLOW_POLL = 1.0  # seconds between looks at whether the server is closing


class ControlHandler:
    def __init__(
        self,
        config: Callable[[], GatewayConfig],
        supervisor: Supervisor,
        reload: Callable[[], Awaitable[GatewayConfig]],
        recent_logs: RecentLines | None,
    ) -> None:
        self._config = config
        self._supervisor = supervisor
        self._reload = reload
        self._logs = recent_logs
        self._closing = False

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/gateway/state", self.state),
            web.get("/gateway/models", self.models),
            web.get("/gateway/logs", self.logs),
            web.get("/gateway/logs/stream", self.logs_stream),
            web.post("/gateway/load", self.load),
            web.post("/gateway/unload", self.unload),
            web.post("/gateway/reload", self.reload),
        ]

    async def state(self, request: web.Request) -> web.Response:
        return web.json_response(self._supervisor.snapshot())

    async def models(self, request: web.Request) -> web.Response:
        state = self._supervisor.snapshot()
        engines = {e["model"]: e for e in state["engines"]}
        running = {(e["model"], e["variant"]["context"]) for e in state["engines"] if e["pid"]}
        capacity, footprint = self._supervisor.capacity, self._supervisor.footprint
        models = [
            {
                "name": m.name,
                "aliases": list(m.aliases),
                "default_max_tokens": m.default_max_tokens,
                "tokens_per_byte": self._supervisor.estimator.ratio(m.name),
                "keep_loaded": m.keep_loaded,
                "engine": engines[m.name]["state"] if m.name in engines else "idle",
                "variants": [
                    {
                        "context": v.context,
                        "capacity": capacity(v).slot_context,  # what one request may use
                        "slots": capacity(v).slots,
                        "shared_kv": capacity(v).shared is not None,
                        "running": (m.name, v.context) in running,
                        "memory": footprint(v).as_json(),
                    }
                    for v in m.variants
                ],
            }
            for m in self._config().models
        ]
        server = self._config().server  # what a front tier (llm-gateway front) sizes itself by
        return web.json_response(
            {
                "models": models,
                "memory": state["memory"],
                "queue_limit": server.queue_limit,
                "shutdown_delay": server.shutdown_delay,
            }
        )

    async def logs(self, request: web.Request) -> web.Response:
        lines = _last(self._logs.lines if self._logs else [], _int_query(request, "lines", DEFAULT_LOG_LINES))
        return web.Response(text="".join(f"{line}\n" for line in lines), content_type="text/plain")

    async def logs_stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the recent lines, then every new one as it is logged."""
        if self._logs is None:
            raise InvalidRequest("logging to memory is off")
        backlog = _last(self._logs.lines, _int_query(request, "lines", 20))
        queue = self._logs.follow()
        response = web.StreamResponse(headers=SSE_HEADERS)
        try:
            await response.prepare(request)
            for line in backlog:
                await response.write(sse_data(line))
            while not self._closing:
                with contextlib.suppress(TimeoutError):  # look at _closing now and then
                    await response.write(sse_data(await asyncio.wait_for(queue.get(), FOLLOW_POLL)))
        except ConnectionResetError:
            pass
        finally:
            self._logs.unfollow(queue)
        return response

    def close(self) -> None:
        """Shutdown: end the live log streams (they would hold the server open)."""
        self._closing = True

    async def load(self, request: web.Request) -> web.Response:
        body, _ = await read_json_object(request)
        name, context = body.get("model"), body.get("context")
        model = self._config().resolve(name) if isinstance(name, str) else None
        if model is None:
            raise ModelNotFound(f"no model is named {name!r}", param="model")
        variant = model.variants[0] if context is None else _variant(model, context)
        await asyncio.shield(self._supervisor.load(variant))
        engine = self._engine(model.name)
        return web.json_response(
            {"model": model.name, "context": variant.context, "pid": engine["pid"] if engine else None}
        )

    async def unload(self, request: web.Request) -> web.Response:
        """Stop one model's engine (`{"model": ...}`), or every engine (no body, or `{}`);
        anything else is refused, so that a typo never unloads everything."""
        name = None
        body, _ = await read_json_object(request) if request.can_read_body else ({}, None)
        if body:
            name = body.get("model")
            if not isinstance(name, str) or set(body) != {"model"}:
                raise InvalidRequest(
                    'give {"model": "<name>"} to unload one model, or no body to unload all', param="model"
                )
            name = self._engine_model(name)
        await asyncio.shield(self._supervisor.unload(name))
        engines = self._supervisor.snapshot()["engines"]
        return web.json_response({"unloaded": name or "all", "engines": engines})

    def _engine_model(self, name: str) -> str:
        """The model a name means: by name or alias, or one whose engine still runs
        though a reload removed it."""
        model = self._config().resolve(name)
        if model is not None:
            return model.name
        if self._engine(name) is not None:
            return name
        raise ModelNotFound(f"no model is named {name!r}", param="model")

    def _engine(self, model: str) -> dict[str, Any] | None:
        return next((e for e in self._supervisor.snapshot()["engines"] if e["model"] == model), None)

    async def reload(self, request: web.Request) -> web.Response:
        try:
            config = await self._reload()
        except ConfigError as exc:
            raise InvalidRequest(f"config rejected, the old one stays: {exc}") from None
        return web.json_response({"reloaded": config.source, "models": [m.name for m in config.models]})


def _variant(model: Model, context: object) -> Variant:
    variant = model.variant_for(context) if isinstance(context, int) else None
    if variant is None:
        contexts = ", ".join(str(v.context) for v in model.variants)
        raise InvalidRequest(
            f"{model.name} has no variant with context {context!r} ({contexts})", param="context"
        )
    return variant


def _int_query(request: web.Request, name: str, default: int) -> int:
    value = request.query.get(name)
    if value is None:
        return default
    # isdigit() alone also passes digits such as '²' that int() refuses.
    if not (value.isascii() and value.isdigit()):
        raise InvalidRequest(f"'{name}' must be a non-negative integer", param=name)
    return int(value)


def _last(lines: Iterable[str], count: int) -> list[str]:
    """The last `count` lines; none for 0 (where `lines[-0:]` would give them all)."""
    return list(lines)[-count:] if count else []
