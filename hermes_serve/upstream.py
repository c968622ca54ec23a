"""The engine over HTTP: ``model.upstream``, an engine's or a router's base URL.

The gateway stays what it is (keys, limits, the ledger, the queue, isolation, metering); what
it called in-process it calls here, as an ASGI app that relays each request to the upstream
over a pool of connections and relays the answer back:

- a stream is passed on one server-sent event at a time, as vLLM's in-process app sends it
  (the meters read whole events);
- a client that leaves closes the upstream connection, and vLLM aborts the request;
- the upstream never sees a client's key: it gets ``model.upstream_api_key``, or nothing;
- an upstream that cannot be reached is a 503, a 5xx, a broken or silent connection a 502,
  each with ``Retry-After``; mid-stream, the API's own error event ends the stream.

Readiness follows the upstream's ``/health``, and the models it serves its ``/v1/models``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import httpx
from starlette.types import Receive, Scope, Send

from . import errors
from .config import Settings
from .request import read_body

logger = logging.getLogger("hermes_serve.upstream")

# Hop-by-hop (RFC 9110 7.6.1) and what httpx sets itself: never relayed either way.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "accept-encoding",
        "content-encoding",
    }
)
# The gateway's own, never the upstream's: its request id, and the server's date and name.
ANSWER_DROPS = HOP_BY_HOP | {"x-request-id", "date", "server"}
PROBE_INTERVAL_S = 2.0
PROBE_TIMEOUT_S = 2.0


class Upstream:
    """An HTTP engine in the in-process engine's place: the same ``ready``,
    ``served_models``, ``start``, ``use_adapters`` and ``stop``."""

    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        model = settings.model
        self.url = model.upstream.rstrip("/")
        self._credential = {"authorization": f"Bearer {model.upstream_api_key}"} if model.upstream_api_key else {}
        timeout = httpx.Timeout(
            connect=model.upstream_connect_timeout_s,
            read=model.upstream_read_timeout_s,
            write=model.upstream_read_timeout_s,
            pool=settings.admission.queue_timeout_s,
        )
        # One connection per request the engines may run, and some for the other routes.
        connections = settings.admission.max_concurrency + 16
        self._client = httpx.AsyncClient(
            base_url=self.url,
            timeout=timeout,
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            transport=transport,
        )
        self._ready = False
        self._served: frozenset[str] = frozenset({model.served_name})
        self._prober: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def served_models(self) -> frozenset[str]:
        return self._served

    async def start(self) -> Upstream:
        """Starts following the upstream's health; returns the app the gateway calls."""
        await self._probe()
        self._prober = asyncio.create_task(self._follow(), name="upstream-probe")
        logger.info("relaying to an upstream engine (%s)", "ready" if self._ready else "not ready yet")
        return self

    async def use_adapters(self, adapter_paths: dict[str, str], reload_all: bool = False) -> None:
        if adapter_paths:
            logger.warning("model.adapters are the upstream engines' own: keys name them, the gateway loads none")

    async def stop(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
        await self._client.aclose()

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            await self._probe()

    async def _probe(self) -> None:
        try:
            health = await self._client.get("/health", headers=self._credential, timeout=PROBE_TIMEOUT_S)
            ready = health.status_code == 200
            if ready:
                models = await self._client.get("/v1/models", headers=self._credential, timeout=PROBE_TIMEOUT_S)
                found = frozenset(str(m.get("id")) for m in models.json().get("data", []) if isinstance(m, dict))
                self._served = found or self._served
        except (httpx.HTTPError, ValueError, AttributeError):
            ready = False
        if ready != self._ready:
            (logger.info if ready else logger.warning)("upstream engine %s", "ready" if ready else "not answering")
        self._ready = ready

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        if body is None:
            return  # the client left before anything was sent
        task = asyncio.current_task()
        assert task is not None
        left = False

        def client_left(watch: asyncio.Task[bool]) -> None:
            nonlocal left
            if not watch.cancelled() and watch.result():
                left = True
                task.cancel()  # closes the upstream connection: vLLM aborts the request

        watch = asyncio.create_task(_disconnected(receive))
        watch.add_done_callback(client_left)
        try:
            await self._relay(scope, body, send)
        except asyncio.CancelledError:
            if not left:
                raise
            task.uncancel()
        finally:
            watch.remove_done_callback(client_left)
            watch.cancel()

    async def _relay(self, scope: Scope, body: bytes, send: Send) -> None:
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.decode("latin-1").lower() not in HOP_BY_HOP
        ]
        headers += [("accept-encoding", "identity"), *self._credential.items()]
        path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string", b"")
        url = path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
        request = self._client.build_request(scope["method"], url, headers=headers, content=body)
        try:
            response = await self._client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            logger.warning("upstream not reachable: %s", type(exc).__name__)
            return await errors.send_error(send, errors.upstream_unavailable())
        except httpx.HTTPError as exc:
            logger.warning("upstream failed before answering: %s", type(exc).__name__)
            return await errors.send_error(send, errors.upstream_error())
        try:
            if response.status_code >= 500:  # its internals are not the client's to read
                logger.warning("upstream answered %d", response.status_code)
                return await errors.send_error(send, errors.upstream_error())
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [
                        (k.encode("latin-1"), v.encode("latin-1"))
                        for k, v in response.headers.multi_items()
                        if k.lower() not in ANSWER_DROPS
                    ],
                }
            )
            # Decoded: an upstream that compresses all the same is relayed plain (its
            # content-encoding is not passed on).
            chunks = _events(response.aiter_bytes()) if _is_stream(response) else response.aiter_bytes()
            try:
                async for chunk in chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.HTTPError as exc:
                logger.warning("upstream failed mid-answer: %s", type(exc).__name__)
                raise errors.engine_failed() from None
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


async def _disconnected(receive: Receive) -> bool:
    with contextlib.suppress(Exception):
        while (await receive())["type"] != "http.disconnect":
            pass
        return True
    return False


def _is_stream(response: httpx.Response) -> bool:
    return bool(response.headers.get("content-type", "").startswith("text/event-stream"))


async def _events(raw: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Whole server-sent events (each with its blank line), however the network cut them."""
    pending = b""
    async for chunk in raw:
        pending += chunk
        end = pending.find(b"\n\n")
        while end >= 0:
            yield pending[: end + 2]
            pending = pending[end + 2 :]
            end = pending.find(b"\n\n")
    if pending:
        yield pending
