"""The pure-ASGI front of the service. One request, top-down:

route -> key -> body (size, JSON, the API's checks) -> limits -> admission -> engine -> record.

Everything here happens once per request; a stream's chunks only pass the API's meter.
Every error leaves in the API's error shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from . import console, contract, errors, routes
from .admission import AdmissionQueue
from .apis import Api
from .auth import KeyRing, Principal
from .clock import Clock, WallClock, loop_time, wall_time
from .config import Settings
from .errors import OpenAIError
from .limits import Limits
from .metrics import GatewayMetrics
from .record import Fate, Record, charge, observe, usage_row
from .relay import Relay
from .reply import Reply
from .request import ClientDisconnected, Incoming
from .tenancy import CLIENT_HEADERS, Tenancy
from .usage import reports
from .usage.standing import usage_json
from .usage.writer import Writer

logger = logging.getLogger("hermes_serve.access")

ABORT_GRACE_S = 1.0  # how long vLLM gets to abort on the disconnect it is shown


class ASGIApp(Protocol):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None: ...


@dataclass
class Exchange:
    """One request on its way down the path: what the client sent, what it is sent back, and
    the record of what happened."""

    request: Incoming
    reply: Reply
    record: Record
    route: routes.Route | None
    params: dict[str, str]
    """The route's path parameters."""
    principal: Principal | None = None
    """The key, once authenticated."""


class Gateway:
    def __init__(
        self,
        settings: Settings,
        keyring: KeyRing,
        limits: Limits,
        admission: AdmissionQueue,
        metrics: GatewayMetrics,
        clock: Clock = loop_time,
        wall_clock: WallClock = wall_time,
        tenancy: Tenancy | None = None,
        usage: Writer | None = None,
    ) -> None:
        self._settings = settings
        self._keyring = keyring
        self._limits = limits
        self._admission = admission
        self._metrics = metrics
        self._clock = clock
        self._wall_clock = wall_clock
        secret = settings.model.tenant_secret.encode() if settings.model.tenant_secret else None
        self._tenancy = tenancy or Tenancy(secret)
        self._usage = usage
        self._local: dict[str, Callable[[Exchange], Awaitable[None]]] = {
            "health": self._health,
            "usage": self._key_usage,
            "organization_usage": self._organization_usage,
            "openapi": self._openapi,
            "console": self._console,
        }
        self._contract: dict[str, Any] | None = None
        self._engine_app: ASGIApp | None = None
        self._engine_ready: Callable[[], bool] = lambda: False
        self._served: Callable[[], frozenset[str]] = lambda: frozenset({settings.model.served_name})

    def attach(
        self, engine_app: ASGIApp, ready: Callable[[], bool], served: Callable[[], frozenset[str]] | None = None
    ) -> None:
        """Route to the engine's app from now on; ``served`` names the models it serves."""
        self._engine_app, self._engine_ready = engine_app, ready
        self._contract = None  # vLLM's schemas come from the (new) engine app
        if served is not None:
            self._served = served
        self._warn_unknown_models()

    def _warn_unknown_models(self) -> None:
        for key, models in self._keyring.unknown_models(self._served()).items():
            logger.warning("key %r lists models nothing serves (yet): %s", key, ", ".join(models))

    @property
    def ready(self) -> bool:
        return self._engine_app is not None and self._engine_ready()

    @property
    def keyring(self) -> KeyRing:
        return self._keyring

    def use_keys(self, keyring: KeyRing) -> None:
        """Swap the keys in one step: requests already running keep going; the queued
        requests of keys that are gone are refused."""
        revoked = self._keyring.revoked_by(keyring)
        self._keyring = keyring
        self._warn_unknown_models()
        refused = self._admission.refuse(revoked, errors.key_revoked()) if revoked else 0
        logger.info(
            "keys reloaded: %d keys, %d revoked, %d queued requests refused", len(keyring), len(revoked), refused
        )

    def may_read_metrics(self, headers: Headers) -> bool:
        if not self._settings.auth.metrics_require_key:
            return True
        try:
            return self._keyring.authenticate(headers.get("authorization"), headers.get("x-api-key")) is not None
        except OpenAIError:  # two different keys
            return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # refused before accept: 403
            return
        if scope["type"] != "http":
            return  # lifespan belongs to BentoML
        request = Incoming(scope, receive)
        route, params = routes.find(request.path) or (None, {})
        # Ours, never the client's: vLLM names its engine request after it (X-Request-Id).
        record = Record(secrets.token_hex(12), request.method, routes.label(route), self._clock())
        record.started_at = self._wall_clock()
        reply = Reply(send, record, route.dialect if route else errors.OPENAI)
        try:
            await self._serve(Exchange(request, reply, record, route, params))
        except OpenAIError as error:
            await reply.fail(error)
        except ClientDisconnected:
            record.end(errors.CLIENT_CLOSED_REQUEST)
        except Exception:
            logger.exception("unhandled error id=%s route=%s", record.request_id, record.route)
            await reply.fail(errors.internal_error())
        finally:
            await reply.finish()
            request.close()
            if route is None or not route.open:
                observe(record, self._metrics, self._clock() - record.started)
                if self._usage is not None:
                    self._usage.record(usage_row(record, self._wall_clock()))

    async def _serve(self, exchange: Exchange) -> None:
        request, route = exchange.request, exchange.route
        if route is None:
            raise errors.not_found(request.path)
        if request.method not in route.methods:
            raise errors.method_not_allowed(request.method, request.path, route.methods)
        exchange.record.client_request_id = request.client_request_id()
        if route.open and route.local is not None:
            return await self._local[route.local](exchange)
        principal = self._keyring.authenticate(request.headers.get("authorization"), request.headers.get("x-api-key"))
        if principal is None:
            raise errors.invalid_api_key()
        exchange.principal, exchange.record.key = principal, principal.name
        if principal.expires_at is not None and self._wall_clock() >= principal.expires_at:
            raise errors.key_expired()
        if route.refusal is not None:
            raise route.refusal()
        if route.local is not None:
            return await self._local[route.local](exchange)
        if not self.ready:
            raise errors.not_ready()
        model = None
        if request.method == "POST":
            body = await request.read_json(self._settings.server.max_body_bytes)
            model = exchange.record.model = self._check_model(principal, body)
            if route.api is not None:
                return await self._generate(exchange, route.api, body, model)
            request.replace_body(body)
        answer, params = route.answer, exchange.params
        transform = None if answer is None else (lambda data: answer(data, params, principal))
        relay = Relay(exchange.reply, model=model, transform=transform, engine_alive=lambda: self.ready)
        await self._engine(exchange, relay, route.engine_path)

    def _check_model(self, principal: Principal, body: Any) -> str:
        """The model the request names (vLLM's default: the base model), if the key may use
        it; otherwise the same 404 as a model that does not exist, so names do not leak."""
        model = body.get("model") if isinstance(body, dict) else None
        model = model if isinstance(model, str) and model else self._settings.model.served_name
        if not principal.may_use(model):
            raise errors.model_not_found(model)
        return model

    async def _generate(self, exchange: Exchange, api: Api, body: Any, model: str) -> None:
        principal, max_model_len = exchange.principal, self._settings.model.max_model_len
        assert principal is not None
        exchange.record.api = api.name
        api.validate(body)
        exchange.record.end_user = api.end_user(body)
        sequences = api.sequences(body, self._settings.server.max_n)
        self._tenancy.claim(body, principal)
        meter = api.meter(body)
        exchange.request.replace_body(body)
        reservation = await self._limits.admit(principal, api.estimate(body, max_model_len))
        exchange.record.admitted = True
        exchange.reply.add_headers(reservation.headers)
        # The answer's end waits for its tokens to be settled (below).
        relay = Relay(exchange.reply, meter, model=model, hold_end=True, engine_alive=lambda: self.ready)
        try:
            await self._run(exchange, relay, sequences)
        finally:
            fate = Fate.of(exchange.request.delivered, relay.refused)
            used = exchange.record.usage = charge(meter, fate, lambda: api.prompt_tokens(body, max_model_len))
            await self._limits.settle(reservation, used.total)
            await relay.release()

    async def _run(self, exchange: Exchange, relay: Relay, sequences: int) -> None:
        """Wait for a slot (one per sequence the request asks for), run the engine, and stop it
        when the client leaves or time is up."""
        request, limit_s = exchange.request, self._settings.admission.request_timeout_s
        work = asyncio.create_task(self._admit_and_serve(exchange, relay, sequences))
        gone = asyncio.create_task(request.disconnected.wait())
        remaining = limit_s - (self._clock() - exchange.record.started)
        try:
            await asyncio.wait({work, gone}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if work.done():
            return work.result()  # re-raises the queue's refusal and anything unexpected
        await self._abandon(work, request, relay)
        if request.disconnected.is_set():
            raise ClientDisconnected
        raise errors.request_timeout(limit_s)

    async def _admit_and_serve(self, exchange: Exchange, relay: Relay, sequences: int) -> None:
        principal = exchange.principal
        assert principal is not None
        waiting_since = self._clock()
        async with contextlib.AsyncExitStack() as stack:
            with self._metrics.waiting.track_inprogress():
                await stack.enter_async_context(
                    self._admission.slot(
                        principal.name,
                        priority=principal.priority,
                        key_max_concurrency=principal.max_concurrency,
                        timeout_s=self._settings.admission.queue_timeout_s,
                        weight=sequences,
                    )
                )
            exchange.record.queue_wait_s = self._clock() - waiting_since
            self._metrics.queue_wait.observe(exchange.record.queue_wait_s)
            with self._metrics.running.track_inprogress():
                await self._engine(exchange, relay)

    async def _engine(self, exchange: Exchange, relay: Relay, path: str | None = None) -> None:
        """The engine's app, on the request as the engine may see it (``path``: the engine's own)."""
        assert self._engine_app is not None and exchange.principal is not None
        owned = self._tenancy.headers(exchange.principal, exchange.record.request_id)
        scope = exchange.request.engine_scope(path, headers=owned, drop=CLIENT_HEADERS)
        await self._engine_app(scope, exchange.request.engine_receive, relay.send)

    @staticmethod
    async def _abandon(work: asyncio.Task[None], request: Incoming, relay: Relay) -> None:
        """Stop the engine's work on this request: vLLM aborts a request when its client
        disconnects (it runs handlers in their own task, so cancelling ours is not enough)."""
        relay.detach()
        request.cut_off()
        if request.delivered:
            await asyncio.wait({work}, timeout=ABORT_GRACE_S)
        work.cancel()  # still queued, or slow to abort: no-op if it already finished
        await asyncio.gather(work, return_exceptions=True)

    async def _health(self, exchange: Exchange) -> None:
        if not self.ready:
            raise errors.not_ready()
        await exchange.reply.respond(200, {"status": "ok", "model": self._settings.model.served_name})

    async def _openapi(self, exchange: Exchange) -> None:
        if self._contract is None:
            engine_openapi = getattr(self._engine_app, "openapi", None)
            self._contract = contract.document(engine_openapi() if callable(engine_openapi) else {})
        await exchange.reply.respond(200, self._contract)

    async def _console(self, exchange: Exchange) -> None:
        found = console.page(exchange.params.get("file", "index.html"))
        if found is None:
            raise errors.not_found("/console/" + exchange.params.get("file", ""))
        body, content_type = found
        await exchange.reply.respond_raw(200, body, {**console.HEADERS, "content-type": content_type})

    async def _key_usage(self, exchange: Exchange) -> None:
        """The calling key's limits as they stand, and what it used this day and month."""
        principal = exchange.principal
        assert principal is not None
        standing = await self._limits.standing(principal)
        used = None
        if self._usage is not None:
            used = await self._read_usage(reports.key_usage, self._usage.store, principal.name, self._wall_clock())
        await exchange.reply.respond(200, usage_json(principal, standing, used))

    async def _organization_usage(self, exchange: Exchange) -> None:
        """OpenAI's usage API. An admin key sees every key; any other key only itself."""
        principal = exchange.principal
        assert principal is not None
        if self._usage is None:
            raise errors.usage_not_recorded()
        query = exchange.request.query_pairs()
        if not principal.admin:
            asked = [v for k, v in query if k.removesuffix("[]") == "api_key_ids"]
            if any(name != principal.name for name in asked):
                raise errors.usage_of_other_keys()
            query = [(k, v) for k, v in query if k.removesuffix("[]") != "api_key_ids"] + [
                ("api_key_ids", principal.name)
            ]
        try:
            page = await self._read_usage(reports.completions_usage_query, self._usage.store, query, self._wall_clock())
        except reports.UsageQueryError as exc:
            raise errors.invalid_value(str(exc), exc.param) from None
        await exchange.reply.respond(200, page)

    @staticmethod
    async def _read_usage(read: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.to_thread(read, *args)
        except reports.UsageQueryError:
            raise
        except Exception as exc:
            logger.warning("usage store did not answer a read: %s", type(exc).__name__)
            raise errors.usage_unavailable() from None


# What a browser page on an allowed origin may send and read (the SDKs add their own headers).
CORS_EXPOSED = ["x-request-id", "retry-after", "x-should-retry"] + [
    f"x-ratelimit-{what}-{unit}" for what in ("limit", "remaining", "reset") for unit in ("requests", "tokens")
]


def with_cors(app: ASGIApp, origins: list[str]) -> ASGIApp:
    """Browsers stay out unless ``origins`` lists theirs: no CORS headers, no preflight."""
    if not origins:
        return app
    from starlette.middleware.cors import CORSMiddleware

    return CORSMiddleware(
        app,
        allow_origins=origins,
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=["*"],  # keys travel in headers, never cookies: credentials stay off
        expose_headers=CORS_EXPOSED,
        max_age=600,
    )


class Front:
    """Pure-ASGI middleware around BentoML's app. BentoML keeps its probes and ``/metrics``
    (which asks for a key when configured); every other request goes to ``gateway_app``, so
    the gateway answers every path in its own shapes (BentoML's router would answer some,
    such as a path with a newline in it, with its own plain-text 404)."""

    def __init__(self, app: ASGIApp, gateway_app: ASGIApp, gateway: Callable[[], Gateway | None]) -> None:
        self._app = app
        self._gateway_app = gateway_app
        self._gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in routes.BENTOML_PATHS - {"/metrics"}:
            return await self._app(scope, receive, send)
        if scope["path"] != "/metrics":
            return await self._gateway_app(scope, receive, send)
        gateway = self._gateway()
        if scope["type"] == "http" and gateway is not None and not gateway.may_read_metrics(Headers(scope=scope)):
            return await errors.send_error(send, errors.invalid_api_key())
        await self._app(scope, receive, send)
