"""RequestHandler: a model-addressed request from arrival to the last byte of its answer.

Parse and validate (nothing bad reaches the supervisor), wait for a lease, count the
prompt exactly when the grant was made on an estimate, forward, and release the lease
exactly once whichever way the request ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway.config.schema import GatewayConfig, Model
from gateway.engine.client import EngineAnswered, EngineRequestError
from gateway.engine.types import adapter_for
from gateway.errors import (
    EngineFailed,
    EngineRejected,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    NotServed,
    Unavailable,
)
from gateway.models import BOUND_SLACK, Needs
from gateway.server.body import read_json_object
from gateway.server.endpoints import ENDPOINTS, Endpoint, check_common, copies, limit_answer, reserve
from gateway.server.keys import CLIENT_LEFT, MODEL, RECORD, REQUEST_ID
from gateway.server.proxy import NotSent, Renamer, engine_request_headers, forward, write_error_event
from gateway.server.record import RequestRecord
from gateway.server.sse import SSE_HEADERS, sse_comment
from gateway.supervisor.requests import Grant, PendingRequest
from gateway.supervisor.supervisor import Supervisor

log = logging.getLogger("gateway.request")

KEEPALIVE_DELAY = 0.5  # a stream waiting longer than this gets ": waiting for model" comments
KEEPALIVE_INTERVAL = 2.0
MAX_RETRIES = 1  # an engine that fails before answering gets the request once more
# An engine whose KV cache ran out before answering cleared its busy slots, so the
# request likely fits when tried again; the bound keeps an engine that stays full from
# cycling it forever.
MAX_ENGINE_FULL_REQUEUES = 3
RETRY_SETTLE = 0.5  # seconds to see whether a failed engine is exiting


_SANE_REQUEST_ID = re.compile(r"[!-~]{1,128}")  # printable ASCII without spaces


def request_id(request: web.Request) -> str:
    """The client's X-Request-Id if it is a sane id, else a fresh one: it goes into log
    lines and headers, where undecodable bytes or control characters would break them."""
    rid = request.get(REQUEST_ID)
    if rid is None:
        given = request.headers.get("X-Request-Id", "")
        rid = given if _SANE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        request[REQUEST_ID] = rid
    return rid


class RequestHandler:
    def __init__(self, config: Callable[[], GatewayConfig], supervisor: Supervisor) -> None:
        self._config = config
        self._supervisor = supervisor

    async def model_request(self, request: web.Request) -> web.StreamResponse:
        endpoint = ENDPOINTS[request.path]
        body, raw = await read_json_object(request)
        check_common(body)
        model = self._resolve(body)
        request[MODEL] = model.name  # for metrics and logs
        endpoint.validate(body)
        _check_engine_serves(model, endpoint)
        ruled = _apply_rules(body, model)
        pending = _pending(request_id(request), endpoint, model, ruled, raw)
        request[RECORD] = RequestRecord(
            pending.request_id, model.name, body["model"], endpoint.path, bool(body.get("stream"))
        )
        forwarded = adapter_for(model).rewrite(model, limit_answer(endpoint, ruled, pending.reserve))
        data = raw if forwarded is body else json.dumps(forwarded).encode()
        call = _Call(self._supervisor, request, endpoint, pending, forwarded, data, body["model"])
        return await call.run(self._config().server.loading_keepalive and bool(body.get("stream")))

    def _resolve(self, body: dict[str, Any]) -> Model:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("'model' must be a non-empty string", param="model")
        model = self._config().resolve(name)
        if model is None:
            available = ", ".join(sorted(n for m in self._config().models for n in (m.name, *m.aliases)))
            raise ModelNotFound(f"the model {name!r} does not exist; available: {available}", param="model")
        return model


def _pending(rid: str, endpoint: Endpoint, model: Model, body: dict[str, Any], raw: bytes) -> PendingRequest:
    """What the supervisor needs to know of a request."""
    pending = PendingRequest(
        request_id=rid,
        model=model,
        kind=endpoint.kind,
        shape=endpoint.shape(body, raw),
        reserve=reserve(endpoint, body, model.default_max_tokens),
    )
    pending.sequences = copies(body) * pending.shape.prompts
    if endpoint.kind in ("other", "rerank") or (endpoint.kind != "chat" and not pending.shape.text_bytes):
        # Nothing to count on the engine: the body's size, or token ids, are the bound;
        # the engine renders Anthropic and Responses bodies through its chat template,
        # which may add any amount (a tools preamble): their size is no bound.
        size = pending.shape.text_bytes + pending.shape.token_ids + BOUND_SLACK
        pending.exact_tokens, pending.method = size, "unbounded" if endpoint.kind == "other" else "bound"
    return pending


def _check_engine_serves(model: Model, endpoint: Endpoint) -> None:
    """501 when the model's engine type lacks the endpoint; 400 when no variant of the
    model is started to serve it."""
    adapter = adapter_for(model)
    unserved = adapter.unserved(model, endpoint.path)
    if unserved:
        raise NotServed(unserved, param="model")
    refusals = [adapter.serves(model, variant, endpoint.kind, endpoint.path) for variant in model.variants]
    if None not in refusals:
        raise InvalidRequest(str(refusals[0]), param="model")


def _apply_rules(body: dict[str, Any], model: Model) -> dict[str, Any]:
    """The model's defaults, forced fields and stripped fields; `body` itself if none."""
    rules = model.request
    if not (rules.defaults or rules.force or rules.strip):
        return body
    rewritten = {**rules.defaults, **body, **rules.force}
    for name in rules.strip:
        rewritten.pop(name, None)
    return rewritten


# An engine that answers these to a counting call lacks the route its `count` names.
_NOT_OFFERED = frozenset({404, 405, 501})


class _Tries:
    """How many times one cause may send a request back to the queue."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self) -> bool:
        """One more try, if any is left."""
        if self.used >= self.limit:
            return False
        self.used += 1
        return True


class _Call:
    """One client request's way through queue, counting and forwarding."""

    def __init__(
        self,
        supervisor: Supervisor,
        request: web.Request,
        endpoint: Endpoint,
        pending: PendingRequest,
        body: dict[str, Any],
        data: bytes,
        requested_name: str,
    ) -> None:
        self.supervisor = supervisor
        self.request = request
        self.endpoint = endpoint
        self.pending = pending
        self.body = body
        self.data = data
        self.requested_name = requested_name
        self.started: web.StreamResponse | None = None  # an SSE answer already under way
        self.retries = _Tries(MAX_RETRIES)  # engine failures before an answer
        self.overflows = _Tries(1)  # the engine refused the prompt as too long
        self.engine_full = _Tries(MAX_ENGINE_FULL_REQUEUES)  # its KV cache ran out first
        self.record: RequestRecord = request[RECORD]

    async def run(self, keepalive: bool) -> web.StreamResponse:
        try:
            while True:
                grant = await self._wait_for_grant(keepalive)
                response = await self._use(grant)
                self._note(grant)
                if response is not None:
                    return response
                self.record.requeues += 1
        except GatewayError as error:
            if self.started is None:
                raise
            await write_error_event(self.started, error)
            return self.started

    def _note(self, grant: Grant) -> None:
        """What the activity table shows of the engine it ran on and of its prompt."""
        needs = grant.selection.needs
        record, pending = self.record, self.pending
        record.context = grant.instance.variant.context
        record.waited_for_start = (
            record.waited_for_start or grant.instance.process.started_monotonic > pending.arrived
        )
        exact = pending.exact_tokens is not None
        record.prompt_tokens = pending.exact_tokens if exact else needs.prompt_tokens
        record.counted = pending.method if exact else needs.method

    async def _use(self, grant: Grant) -> web.StreamResponse | None:
        """Serve the request on the granted engine; None when it must wait again."""
        requeue: str | None = None
        served = forwarded = False
        try:
            if grant.count_first:
                requeue = await self._count(grant)
                if requeue:
                    return None
            if self.pending.sequences > 1 and grant.instance.kv_budget is not None:
                requeue = await self._clear_idle_slots(grant)  # it has the engine to itself
                if requeue:
                    return None
            data = await self._with_restored_prompt(grant)
            forwarded = True
            response = await forward(
                self.request,
                grant.instance,
                data,
                engine_request_headers(self.request.headers),
                Renamer.between(grant.instance.served_name, self.requested_name),
                self.started,
                self._headers(grant),
            )
            served = True
            return response
        except NotSent as exc:
            forwarded = False  # the engine ended it (or never had it)
            requeue = await self._after_not_sent(grant, exc)
            return None
        finally:
            # A request the engine got and did not finish (its client left) may still be
            # running there: the supervisor keeps its room until the engine lets it go.
            abandoned = forwarded and (not served or bool(self.request.get(CLIENT_LEFT)))
            self.supervisor.release(grant, requeue, served, abandoned)

    async def _with_restored_prompt(self, grant: Grant) -> bytes:
        """The body to send: to the engine slot the prompt cache restored what this
        request continues into (`id_slot`), if it did."""
        instance, pending = grant.instance, self.pending
        if instance.prompts is None or pending.sequences > 1 or "id_slot" in self.body:
            return self.data
        slot = await instance.prompts.restore_for(
            instance.client,
            instance.model,
            instance.variant,
            pending.kind,
            self.body,
            pending.reserve,
            instance.upper_bound(pending.kind, pending.shape),
            instance.restored_prompts,
        )
        return self.data if slot is None else json.dumps({**self.body, "id_slot": slot}).encode()

    async def _clear_idle_slots(self, grant: Grant) -> str | None:
        """Clear the engine's idle slots for a request of several sequences; a reason to
        requeue if the engine did not answer."""
        try:
            await grant.instance.engine.clear_idle_slots(grant.instance.client)
        except EngineRequestError as exc:
            return self._retry_or_fail(f"clearing idle slots failed: {exc}")
        return None

    async def _count(self, grant: Grant) -> str | None:
        """Count exactly (unless a bound proves it fits); a reason to requeue if too big."""
        instance, pending = grant.instance, self.pending
        bound = instance.upper_bound(pending.kind, pending.shape)
        if bound is not None and instance.room.fits(
            Needs(bound, pending.reserve, "bound", pending.sequences)
        ):
            pending.exact_tokens, pending.method = bound, "bound"
            return None
        if instance.counter is None:  # the engine cannot count: the estimate stands
            return None
        wait = instance.variant.timeouts.health_check
        try:
            async with asyncio.timeout(wait):
                tokens = int(await instance.counter.count(instance.client, pending.kind, self.body))
        except EngineAnswered as exc:
            if exc.status in _NOT_OFFERED:
                raise EngineFailed(
                    f"the engine does not offer the token count its config names: {exc}"
                ) from None
            raise EngineRejected(exc.status, exc.engine_message) from None
        except EngineRequestError as exc:
            return self._retry_or_fail(f"counting failed: {exc}")
        except TimeoutError:
            return self._retry_or_fail(f"counting took over {wait:g}s (health_check_timeout)")
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # an answer of another shape
            raise EngineFailed(
                f"the engine's token count could not be read: {type(exc).__name__}: {exc}"
            ) from None
        fits_shared_cache = await asyncio.shield(self.supervisor.confirm(grant, pending.shape, tokens))
        pending.exact_tokens, pending.method = tokens, "exact"
        if not instance.room.fits(pending.needs(tokens)):
            return (
                f"counted {tokens} prompt tokens + {pending.reserve} reserve "
                f"({pending.sequences} sequence(s)) > context of {instance.variant.key}: upgrade"
            )
        if not fits_shared_cache:  # granted on a low estimate: wait for room, then go
            return f"counted {tokens} prompt tokens: no room in the shared KV cache yet"
        return None

    async def _after_not_sent(self, grant: Grant, exc: NotSent) -> str:
        """Why the request goes back to the queue, or the error that ends it."""
        if exc.prompt_tokens is not None:  # the engine counted more than fits: go larger
            if not self.overflows.take():
                raise EngineFailed(f"the engine refused the prompt twice as too long: {exc}")
            self.pending.exact_tokens, self.pending.method = exc.prompt_tokens, "exact"
            return f"{exc}: the engine counted {exc.prompt_tokens} prompt tokens"
        if exc.engine_full:
            if not self.engine_full.take():
                raise Unavailable(
                    f"{exc}, {self.engine_full.limit + 1} times for this request; retry later",
                    headers={"Retry-After": "1"},
                )
            return f"{exc} (requeue {self.engine_full.used} of {self.engine_full.limit})"
        if grant.instance.cut_off_reason:
            raise EngineFailed(f"cut off before the engine answered: {grant.instance.cut_off_reason}")
        if exc.delivered and not grant.instance.variant.engine.local:
            # An upstream that took the request may have run it (and billed it): never twice.
            raise EngineFailed(
                f"the upstream failed after it got the request, which is not sent again: {exc}"
            )
        # Let a dying engine's exit reach the supervisor first, so the retry waits for a
        # fresh engine instead of being granted the dead one again.
        await asyncio.wait([grant.instance.exited], timeout=RETRY_SETTLE)
        return self._retry_or_fail(str(exc))

    def _retry_or_fail(self, reason: str) -> str:
        if not self.retries.take():
            raise EngineFailed(f"the engine failed twice for this request; last: {reason}")
        return reason

    def _headers(self, grant: Grant) -> dict[str, str]:
        return {
            "X-Request-Id": self.pending.request_id,
            "X-Gateway-Model": grant.instance.model.name,
            "X-Gateway-Context": str(grant.instance.variant.context),
        }

    async def _wait_for_grant(self, keepalive: bool) -> Grant:
        acquiring = asyncio.ensure_future(self.supervisor.acquire(self.pending))
        try:
            while True:
                timeout = KEEPALIVE_INTERVAL if self.started else KEEPALIVE_DELAY
                done, _ = await asyncio.wait({acquiring}, timeout=timeout if keepalive else None)
                if done:
                    return acquiring.result()
                await self._keepalive()
        except BaseException:
            if acquiring.done() and not acquiring.cancelled() and acquiring.exception() is None:
                self.supervisor.release(acquiring.result())  # granted as the client left
            acquiring.cancel()
            raise

    async def _keepalive(self) -> None:
        if self.started is None:
            self.started = web.StreamResponse(
                headers={**SSE_HEADERS, "X-Request-Id": self.pending.request_id}
            )
            await self.started.prepare(self.request)
        await self.started.write(sse_comment(f"waiting for model {self.pending.model.name}"))
