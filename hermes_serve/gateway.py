"""The pure-ASGI front of the service: route check -> auth -> body -> limits -> admission -> engine.

Everything here happens once per request; the only per-chunk work on a stream is a
substring test for vLLM's usage event. Every error leaves as an OpenAI error body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from typing import Any, Callable, Protocol

from . import errors, usage
from .admission import AdmissionQueue
from .auth import KeyRing, Principal
from .clock import Clock, monotonic
from .config import Settings
from .errors import OpenAIError, Message, Receive, Scope, Send
from .limits import RateLimits
from .metrics import GatewayMetrics

logger = logging.getLogger("hermes_serve.access")

# The engine routes a shared service exposes; vLLM's admin routes (sleep, cache reset,
# LoRA loading, ...) stay unreachable. path -> allowed methods.
PUBLIC_ROUTES: dict[str, frozenset[str]] = {
    "/v1/chat/completions": frozenset({"POST"}),
    "/v1/completions": frozenset({"POST"}),
    "/v1/models": frozenset({"GET"}),
    "/tokenize": frozenset({"POST"}),
    "/detokenize": frozenset({"POST"}),
    "/version": frozenset({"GET"}),
}
GENERATION_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})
OPEN_ROUTES = frozenset({"/health"})
ABORTED_OUTCOMES = frozenset({"client_gone", "request_timeout"})
ABORT_GRACE_S = 1.0  # how long vLLM gets to abort on the disconnect it is shown


class ClientDisconnected(Exception):
    """The client went away before its request was read."""


class ASGIApp(Protocol):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None: ...


class Gateway:
    def __init__(
        self,
        settings: Settings,
        keyring: KeyRing,
        rate_limits: RateLimits,
        admission: AdmissionQueue,
        metrics: GatewayMetrics,
        clock: Clock = monotonic,
    ) -> None:
        self._settings = settings
        self._keyring = keyring
        self._limits = rate_limits
        self._admission = admission
        self._metrics = metrics
        self._clock = clock
        self._engine_app: ASGIApp | None = None
        self._engine_ready: Callable[[], bool] = lambda: False

    def attach(self, engine_app: ASGIApp, ready: Callable[[], bool]) -> None:
        self._engine_app, self._engine_ready = engine_app, ready

    @property
    def ready(self) -> bool:
        return self._engine_app is not None and self._engine_ready()

    def may_read_metrics(self, authorization: str | None) -> bool:
        if not self._settings.auth.metrics_require_key:
            return True
        return self._keyring.authenticate(authorization) is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # refused before accept: 403
            return
        if scope["type"] != "http":
            return  # lifespan belongs to BentoML
        exchange = Exchange(scope, receive, send, self._clock)
        try:
            await self._handle(exchange)
        except OpenAIError as error:
            await exchange.fail(error)
        except ClientDisconnected:
            exchange.outcome = "client_gone"
        except Exception:
            logger.exception("unhandled error id=%s route=%s", exchange.request_id, exchange.path)
            await exchange.fail(errors.internal_error())
        finally:
            if not exchange.response_started:
                # Every request gets an answer, even one nobody is left to read: BentoML's
                # timeout middleware waits for a first byte, and would hold the request (and
                # a graceful shutdown) until traffic.timeout otherwise.
                await exchange.fail(errors.client_closed_request())
            exchange.close()
            self._log(exchange)

    async def _handle(self, ex: Exchange) -> None:
        if ex.path == "/health":
            return await self._health(ex)
        methods = PUBLIC_ROUTES.get(ex.path)
        if methods is None:
            raise errors.not_found(ex.path)
        if ex.method not in methods:
            raise errors.method_not_allowed(ex.method, ex.path)
        principal = self._keyring.authenticate(ex.header("authorization"))
        if principal is None:
            self._metrics.rejections.labels("unknown", "invalid_api_key").inc()
            raise errors.invalid_api_key()
        ex.key_name = principal.name
        if not self.ready or self._engine_app is None:
            raise errors.not_ready()
        if ex.path not in GENERATION_ROUTES:
            return await ex.forward(self._engine_app)
        await self._generate(ex, principal, self._engine_app)

    async def _generate(self, ex: Exchange, principal: Principal, engine_app: ASGIApp) -> None:
        body = await ex.read_json(self._settings.server.max_body_bytes)
        usage.validate_request(ex.path, body)
        if body.get("stream"):
            ex.strip_usage_event = not usage.request_usage_in_stream(body)
        ex.replace_body(body)
        estimate = usage.estimate_tokens(body, self._settings.model.max_model_len)
        try:
            reservation = await self._limits.admit(principal, estimate)
        except OpenAIError as error:
            self._metrics.rejections.labels(principal.name, "rate_limited").inc()
            raise error
        ex.extra_headers.update(reservation.headers())
        try:
            await self._run(ex, principal, engine_app)
        finally:
            if ex.tokens is None and ex.in_engine and ex.outcome in ABORTED_OUTCOMES:
                # Cut short, so vLLM sent no usage: charge the prompt and what was streamed,
                # or leaving early would be a way around tokens/min.
                prompt = usage.estimate_prompt_tokens(body, self._settings.model.max_model_len)
                ex.tokens = prompt + ex.events_streamed
            ex.tokens = ex.tokens or 0
            await self._limits.settle(reservation, ex.tokens)
            self._metrics.tokens.labels(principal.name).inc(ex.tokens)

    async def _run(self, ex: Exchange, principal: Principal, engine_app: ASGIApp) -> None:
        limits = self._settings.admission
        waiting_since = self._clock()

        async def admitted_and_served() -> None:
            async with contextlib.AsyncExitStack() as stack:
                with self._metrics.waiting.track_inprogress():
                    await stack.enter_async_context(
                        self._admission.slot(
                            principal.name,
                            priority=principal.priority,
                            key_max_concurrency=principal.max_concurrency,
                            timeout_s=limits.queue_timeout_s,
                        )
                    )
                self._metrics.queue_wait.observe(self._clock() - waiting_since)
                with self._metrics.running.track_inprogress():
                    ex.in_engine = True
                    await engine_app(ex.scope, ex.engine_receive, ex.engine_send)

        work = asyncio.create_task(admitted_and_served())
        gone = asyncio.create_task(ex.disconnected.wait())
        remaining = limits.request_timeout_s - (self._clock() - ex.started)
        try:
            await asyncio.wait({work, gone}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if work.done():
            try:
                return work.result()  # re-raises the queue's refusal and anything unexpected
            except OpenAIError as refusal:  # 503 (queue full) or 504 (waited too long)
                self._metrics.rejections.labels(principal.name, refusal.code or "error").inc()
                raise
        await ex.abandon(work)
        if ex.disconnected.is_set():
            ex.outcome = "client_gone"
            self._metrics.rejections.labels(principal.name, "client_gone").inc()
            return
        self._metrics.rejections.labels(principal.name, "request_timeout").inc()
        await ex.fail(errors.request_timeout(limits.request_timeout_s))

    async def _health(self, ex: Exchange) -> None:
        if not self.ready:
            raise OpenAIError(503, "The model is not ready yet.", type="server_error", code="model_not_ready")
        await ex.respond(200, {"status": "ok", "model": self._settings.model.served_name})

    def _log(self, ex: Exchange) -> None:
        if ex.path in OPEN_ROUTES:
            return
        duration = self._clock() - ex.started
        route = ex.path if ex.path in PUBLIC_ROUTES else "other"
        self._metrics.requests.labels(ex.key_name, route, str(ex.status)).inc()
        self._metrics.duration.labels(route).observe(duration)
        # Key name and numbers only: never the key, never prompt text.
        logger.info(
            "id=%s key=%s %s %s status=%s outcome=%s tokens=%s duration_ms=%.0f",
            ex.request_id, ex.key_name, ex.method, ex.path, ex.status, ex.outcome,
            ex.tokens, duration * 1000,
        )  # fmt: skip


class Exchange:
    """One HTTP request/response pair: its body, headers, state, and the send/receive wrappers."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, clock: Clock) -> None:
        self.scope, self._receive, self._client_send = scope, receive, send
        self.response_started = False
        self.path: str = scope["path"]
        self.method: str = scope["method"]
        self.started = clock()
        self.request_id = self.header("x-request-id") or secrets.token_hex(8)
        self.key_name = "unknown"
        self.status: int | None = None
        self.outcome = "ok"
        self.tokens: int | None = None
        self.events_streamed = 0
        self.extra_headers: dict[str, str] = {"x-request-id": self.request_id}
        self.strip_usage_event = False
        self.disconnected = asyncio.Event()
        self._engine_cut_off = asyncio.Event()  # what the engine sees as its client leaving
        self._body: bytes | None = None
        self._body_sent = False
        self._closed = False
        self._engine_detached = False
        self.in_engine = False
        self._streaming = False
        self._buffer: list[bytes] | None = None
        self._start: Message | None = None
        self._watcher: asyncio.Task[None] | None = None

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    async def _send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.response_started = True
        await self._client_send(message)

    def header(self, name: str) -> str | None:
        return _scope_header(self.scope, name.encode())

    # --- request side ---------------------------------------------------------------------

    async def read_json(self, limit: int) -> Any:
        declared = self.header("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise errors.body_too_large(limit)
        chunks, size = [], 0
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.disconnected.set()
                raise ClientDisconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise errors.body_too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except UnicodeDecodeError:
            raise errors.bad_json("it is not valid UTF-8") from None
        except json.JSONDecodeError as exc:
            raise errors.bad_json(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
        self._watcher = asyncio.get_running_loop().create_task(self._watch_disconnect())
        return body

    def replace_body(self, body: Any) -> None:
        self._body = json.dumps(body, ensure_ascii=False).encode()
        headers = [(k, v) for k, v in self.scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(self._body)).encode()))
        self.scope = {**self.scope, "headers": headers}

    async def _watch_disconnect(self) -> None:
        # The body is consumed; the next message the server sends is the disconnect.
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.disconnected.set()
        self._engine_cut_off.set()

    async def engine_receive(self) -> Message:
        if not self._body_sent and self._body is not None:
            self._body_sent = True
            return {"type": "http.request", "body": self._body, "more_body": False}
        await self._engine_cut_off.wait()
        return {"type": "http.disconnect"}

    async def abandon(self, work: asyncio.Task[None]) -> None:
        """Stop the engine's work on this request: vLLM aborts a request when its client
        disconnects (it runs handlers in their own task, so cancelling ours is not enough)."""
        self._engine_detached = True
        self._engine_cut_off.set()
        if self.in_engine:
            await asyncio.wait({work}, timeout=ABORT_GRACE_S)
        work.cancel()  # still queued, or slow to abort: no-op if it already finished
        await asyncio.gather(work, return_exceptions=True)

    # --- response side --------------------------------------------------------------------

    async def forward(self, app: ASGIApp) -> None:
        await app(self.scope, self._receive, self.engine_send)

    async def engine_send(self, message: Message) -> None:
        if self._closed or self._engine_detached:
            return
        if message["type"] == "http.response.start":
            self.status = message["status"]
            content_type = _header_of(message, b"content-type")
            self._streaming = content_type.startswith(b"text/event-stream")
            if self.status >= 400 or not self._streaming:
                # Errors are rewritten into the OpenAI shape; JSON answers carry usage.
                self._start, self._buffer = message, []
                return
            await self._send(self._with_headers(message))
            return
        chunk: bytes = message.get("body", b"")
        if self._buffer is not None:
            self._buffer.append(chunk)
            if not message.get("more_body", False):
                await self._finish_buffered(b"".join(self._buffer))
            return
        if self._streaming:
            self.events_streamed += chunk.count(b"data: ")
            tokens = usage.usage_from_sse_chunk(chunk)
            if tokens is not None:
                self.tokens = tokens
                if self.strip_usage_event:
                    if not message.get("more_body", False):
                        await self._send({"type": "http.response.body", "body": b""})
                    return
        await self._send(message)

    async def _finish_buffered(self, payload: bytes) -> None:
        assert self._start is not None
        status = self._start["status"]
        if status >= 400:
            # FastAPI's 422 for a malformed field is a 400 in the OpenAI API.
            status = self.status = 400 if status == 422 else status
            self.outcome = "error"
            payload = _openai_error_payload(status, payload)
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
            start = {**self._start, "status": status, "headers": headers}
        else:
            self.tokens = usage.usage_from_json(payload)
            start = self._start
        await self._send(self._with_headers(start))
        await self._send({"type": "http.response.body", "body": payload})

    def _with_headers(self, start: Message) -> Message:
        extra = [(k.encode(), v.encode()) for k, v in self.extra_headers.items()]
        return {**start, "headers": [*start.get("headers", []), *extra]}

    async def respond(self, status: int, body: Any) -> None:
        self.status = status
        await self._send(self._with_headers({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}))
        await self._send({"type": "http.response.body", "body": errors.encode(body)})

    async def fail(self, error: OpenAIError) -> None:
        """Answer with ``error``: a full response before the first byte, else a final SSE frame."""
        if self._closed:
            return
        if self.outcome == "ok":  # a client that left stays "client_gone"
            self.outcome = error.code or "error"
        if self.status is None or self._buffer is not None:
            self.status = error.status
            self._closed = True
            await errors.send_error(self._send, error, self.extra_headers)
            return
        self._closed = True
        await self._send({"type": "http.response.body", "body": errors.sse_error_frame(error), "more_body": False})


def _header_of(message: Message, name: bytes) -> bytes:
    for key, value in message.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return b""


def _openai_error_payload(status: int, payload: bytes) -> bytes:
    """vLLM's errors are already OpenAI-shaped; FastAPI's ``{"detail": ...}`` and others are not."""
    try:
        body = json.loads(payload)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict) and "message" in body["error"]:
        error = body["error"]
        return errors.encode(errors.error_body(str(error["message"]), str(error.get("type") or "invalid_request_error"), error.get("code"), error.get("param")))
    if status >= 500:
        return errors.encode(errors.internal_error().body())
    detail = body.get("detail") if isinstance(body, dict) else None
    message = detail if isinstance(detail, str) else json.dumps(detail) if detail else "Bad request."
    return errors.encode(errors.error_body(message, "invalid_request_error"))


class MetricsGuard:
    """Pure-ASGI middleware around BentoML's app: ``/metrics`` asks for a key when configured.

    BentoML serves ``/metrics`` itself, before the gateway's mount, so the check wraps it.
    """

    def __init__(self, app: ASGIApp, gateway: Callable[[], Gateway | None]) -> None:
        self._app = app
        self._gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/metrics":
            gateway = self._gateway()
            authorization = _scope_header(scope, b"authorization")
            if gateway is not None and not gateway.may_read_metrics(authorization):
                await errors.send_error(send, errors.invalid_api_key())
                return
        await self._app(scope, receive, send)


def _scope_header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None
