"""GatewayServer: the aiohttp application and its lifecycle (start, serve, shut down)."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway import __version__
from gateway.config import ConfigError, ConfigRun, GatewayConfig
from gateway.engine.manager import EngineManager, longest_stop
from gateway.server.auth import auth_middleware
from gateway.server.control import ControlHandler
from gateway.server.dashboard import Dashboard
from gateway.server.endpoints import ENDPOINTS, UNSUPPORTED_PREFIXES
from gateway.server.errors import error_middleware, error_response
from gateway.server.handler import RequestHandler
from gateway.server.keys import MODEL
from gateway.server.observe import mark_first_byte, metrics_middleware
from gateway.supervisor.machine import STATES
from gateway.supervisor.supervisor import Supervisor
from gateway.utils.logger import RecentLines
from gateway.utils.metrics import Metrics

log = logging.getLogger("gateway")

SHUTDOWN_GRACE = 5.0  # seconds on top of drain and stop timeouts before giving up
# Connections the kernel completes before the gateway accepts them (capped by
# net.core.somaxconn): a burst of clients (aiohttp's default is 128) must not have its
# connections dropped, to be retried a second later, while the loop is busy.
LISTEN_BACKLOG = 4096


class GatewayServer:
    def __init__(self, config: GatewayConfig, recent_logs: RecentLines | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.manager = EngineManager(self.metrics)
        self.supervisor = Supervisor(config, self.manager, self.metrics)
        self.metrics.watch(self.supervisor.snapshot, STATES)
        self.handler = RequestHandler(lambda: self.config, self.supervisor)
        self.control = ControlHandler(lambda: self.config, self.supervisor, self.reload, recent_logs)
        self.dashboard = Dashboard(self.supervisor, lambda: self.config)
        self.started_at = time.time()
        self._runner: web.AppRunner | None = None
        self._sites: list[web.TCPSite] = []
        self._reloads: asyncio.Task[None] | None = None  # runs reloads one after another
        self._next_reload: asyncio.Future[GatewayConfig] | None = None  # asked for, not started
        self.leaving = False  # shutting down: /health answers 503, connections close after each answer

    def build_app(self) -> web.Application:
        app = web.Application(
            middlewares=[
                metrics_middleware(self.metrics, self.supervisor.live),
                error_middleware,
                auth_middleware(lambda: self.config),
            ],
            client_max_size=self.config.server.max_body_bytes,
        )
        app.on_response_prepare.append(mark_first_byte)
        app.on_response_prepare.append(name_the_model)
        app.on_response_prepare.append(self._close_while_leaving)
        for path in ENDPOINTS:
            app.router.add_post(path, self.handler.model_request)
        for prefix in UNSUPPORTED_PREFIXES:
            app.router.add_route("*", prefix + "{tail:.*}", self._unsupported)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_routes(self.control.routes())
        self.dashboard.install(app)
        return app

    async def reload(self) -> GatewayConfig:
        """Load the config file again; a bad one is refused and the old one kept.

        Reloads run one at a time, and the file's latest content wins: a reload asked
        for while one runs waits for it, then one more run reads the file for every
        request that came meanwhile.
        """
        running = self._reloads is not None and not self._reloads.done()
        if running:
            log.info("config reload asked for while one runs: the file is read again after it")
        if self._next_reload is None:
            self._next_reload = asyncio.get_running_loop().create_future()
            # Marks a refusal as seen even when no caller is left to await it.
            self._next_reload.add_done_callback(lambda f: f.cancelled() or f.exception())
        if not running:
            self._reloads = asyncio.create_task(self._run_reloads(), name="config-reloads")
        # A caller that leaves (a client hanging up) does not cancel the others' reload.
        return await asyncio.shield(self._next_reload)

    async def _run_reloads(self) -> None:
        while self._next_reload is not None:
            done, self._next_reload = self._next_reload, None
            try:
                done.set_result(await self._reload_once())
            except asyncio.CancelledError:  # shutting down
                for future in (done, self._next_reload):
                    if future is not None:
                        future.cancel()
                self._next_reload = None
                raise
            except Exception as exc:  # ConfigError, or a bug: the callers hear of it
                done.set_exception(exc)

    async def _reload_once(self) -> GatewayConfig:
        run = ConfigRun(self.config.source, self.config.server.config_timeout)
        try:
            config = await asyncio.to_thread(run.load)
        except ConfigError as exc:
            log.error("config reload rejected, keeping the old config: %s", exc)
            raise
        finally:
            run.stop()  # kills the Lua process of a reload cancelled by a shutdown
        await asyncio.to_thread(self.manager.learn, config)
        if config.server.listen != self.config.server.listen:
            log.warning("listen addresses change only with a restart")
        keys = (self.config.server.admin_key, self.config.server.api_keys)
        self.config = config
        if keys != (config.server.admin_key, config.server.api_keys):
            self.dashboard.keys_changed()
        self.supervisor.reload(config)
        log.info("config reloaded from %s: %d models", config.source, len(config.models))
        return config

    def _preload(self) -> None:
        preload = self.config.server.preload
        if preload is None:
            return
        name, context = preload
        model = self.config.resolve(name)
        variant = model.variant_for(context) if model else None
        assert variant is not None  # validated with the config
        key = variant.key

        def loaded(done: asyncio.Future[None]) -> None:
            if not done.cancelled() and done.exception() is not None:
                log.error("preload of %s failed: %s", key, done.exception())

        self.supervisor.load(variant).add_done_callback(loaded)

    async def start(self) -> list[str]:
        """Start the supervisor and listen; returns the bound addresses."""
        await asyncio.to_thread(self.manager.learn, self.config)
        self.supervisor.start()
        self._preload()
        # auto_decompress=False: read_json_object (server/body.py) undoes Content-Encoding itself, so every
        # encoding problem gets an answer in OpenAI's shape (aiohttp answers br and zstd
        # with a plain-text 400 before any handler runs).
        self._runner = web.AppRunner(
            self.build_app(), handler_cancellation=True, access_log=None, auto_decompress=False
        )
        await self._runner.setup()
        bound = []
        for host, port in self.config.server.listen:
            site = web.TCPSite(self._runner, host, port, reuse_address=True, backlog=LISTEN_BACKLOG)
            await site.start()
            self._sites.append(site)
            bound.append(f"{host}:{port}")
        log.info(
            "llm-gateway %s listening on %s with %d models",
            __version__,
            ", ".join(bound),
            len(self.config.models),
        )
        return bound

    async def stop(self, announce: bool = True, hurry: asyncio.Event | None = None) -> None:
        """Stop accepting, let in-flight and queued requests finish (bounded), stop the engines.

        With `announce`, /health first answers 503 for server.shutdown_delay seconds while
        every request is still served, so that a load balancer stops sending before the
        listening sockets close; `hurry` set (a second signal) ends that delay early.
        """
        self.leaving = True
        delay = self.config.server.shutdown_delay if announce else 0.0
        if delay > 0:
            log.info("shutting down: /health answers 503; still serving for %gs", delay)
            hurried = asyncio.ensure_future((hurry or asyncio.Event()).wait())
            done, _ = await asyncio.wait([hurried], timeout=delay)
            hurried.cancel()
            if done:
                log.info("shutting down: a second signal ends the delay early")
        log.info("shutting down: no new connections; draining")
        if self._reloads is not None:
            self._reloads.cancel()  # a config still running would hold up the exit
            await asyncio.wait([self._reloads])  # its Lua process is killed by then
        for site in self._sites:
            await site.stop()
        self.control.close()
        self.dashboard.close()
        try:
            if self.supervisor.started:  # (not when the start failed before it)
                await asyncio.wait_for(self.supervisor.shutdown(), self._shutdown_budget())
        except TimeoutError:
            log.error("shutdown took too long: killing the engine")
        finally:
            self.manager.kill_all_now()  # a no-op after a clean stop
            if self._runner is not None:
                await self._runner.cleanup()
            await self.supervisor.close()
            await self.manager.close()
        log.info("stopped")

    def _shutdown_budget(self) -> float:
        """The longest drain and stop any variant may take, and a little more."""
        timeouts = [v.timeouts for m in self.config.models for v in m.variants]
        return max(t.drain + longest_stop(t) for t in timeouts) + SHUTDOWN_GRACE

    async def _unsupported(self, request: web.Request) -> web.Response:
        return error_response(
            501,
            f"{request.path} is not served: llama.cpp engines do not implement it",
            "invalid_request_error",
            "not_implemented",
        )

    async def _health(self, request: web.Request) -> web.Response:
        if self.leaving:
            return web.json_response({"status": "shutting down"}, status=503)
        return web.json_response({"status": "ok"})

    async def _close_while_leaving(self, request: web.Request, response: web.StreamResponse) -> None:
        """on_response_prepare: a client (a load balancer's connection pool) keeps no
        connection open to a gateway on its way out."""
        if self.leaving:
            response.force_close()
            response.headers[hdrs.CONNECTION] = "close"

    async def _metrics(self, request: web.Request) -> web.Response:
        # The format version in the type must be the one generate_latest writes.
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _models(self, request: web.Request) -> web.Response:
        created = int(self.started_at)
        data = []
        for model in self.config.models:
            contexts = [v.context for v in model.variants]
            for name in (model.name, *model.aliases):
                data.append(
                    {
                        "id": name,
                        "object": "model",
                        "created": created,
                        "owned_by": "llm-gateway",
                        "context_length": model.largest_context,
                        "meta": {
                            "n_ctx": model.largest_context,
                            "variants": contexts,
                            "alias_of": model.name if name != model.name else None,
                        },
                    }
                )
        return web.json_response({"object": "list", "data": data})


async def name_the_model(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer to a request whose model is known names it, errors
    and a stream whose headers left before its variant was chosen included."""
    model = request.get(MODEL)
    if model:
        response.headers.setdefault("X-Gateway-Model", model)
