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

import aiohttp
from multidict import CIMultiDict
from starlette.types import Receive, Scope, Send
from yarl import URL

from . import errors
from .config import Settings
from .request import read_body

logger = logging.getLogger("hermes_serve.upstream")

# Hop-by-hop (RFC 9110 7.6.1) and what the HTTP client sets itself: never relayed either way.
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
    ``served_models``, ``start``, ``use_adapters`` and ``stop``.

    aiohttp's pool, not httpx's: httpcore 1.0's rescans every connection on each request
    (encode/httpcore#1035), a cost that grows with the requests in flight."""

    def __init__(self, settings: Settings) -> None:
        model = settings.model
        self.url = model.upstream.rstrip("/")
        self._credential = {"authorization": f"Bearer {model.upstream_api_key}"} if model.upstream_api_key else {}
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=model.upstream_connect_timeout_s, sock_read=model.upstream_read_timeout_s
        )
        # One connection per request the engines may run, and some for the other routes.
        self._connections = settings.admission.max_concurrency + 16
        self._session: aiohttp.ClientSession | None = None
        self._ready = False
        self._served: frozenset[str] = frozenset({model.served_name})
        self._prober: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def served_models(self) -> frozenset[str]:
        return self._served

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:  # made inside the running loop, on first use
            connector = aiohttp.TCPConnector(limit=self._connections, limit_per_host=0)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

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
        if self._session is not None:
            await self._session.close()

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            await self._probe()

    async def _probe(self) -> None:
        probe = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        try:
            async with self._client().get(self.url + "/health", headers=self._credential, timeout=probe) as health:
                ready = health.status == 200
            if ready:
                async with self._client().get(self.url + "/v1/models", headers=self._credential, timeout=probe) as got:
                    models = await got.json(content_type=None)
                found = frozenset(str(m.get("id")) for m in models.get("data", []) if isinstance(m, dict))
                self._served = found or self._served
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
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
        headers = CIMultiDict(
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.decode("latin-1").lower() not in HOP_BY_HOP
        )
        headers.update({"accept-encoding": "identity", **self._credential})
        path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        url = URL(self.url + path + ("?" + query if query else ""), encoded=True)
        try:
            response = await self._client().request(
                scope["method"], url, headers=headers, data=body, skip_auto_headers=("user-agent",)
            )
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            logger.warning("upstream not reachable: %s", type(exc).__name__)
            return await errors.send_error(send, errors.upstream_unavailable())
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.warning("upstream failed before answering: %s", type(exc).__name__)
            return await errors.send_error(send, errors.upstream_error())
        finished = False
        try:
            if response.status >= 500:  # its internals are not the client's to read
                logger.warning("upstream answered %d", response.status)
                return await errors.send_error(send, errors.upstream_error())
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": [
                        (k.lower().encode("latin-1"), v.encode("latin-1"))  # ASGI's names are lower case
                        for k, v in response.headers.items()
                        if k.lower() not in ANSWER_DROPS
                    ],
                }
            )
            # Decoded: an upstream that compresses all the same is relayed plain (its
            # content-encoding is not passed on).
            chunks = response.content.iter_any()
            try:
                async for chunk in _events(chunks) if _is_stream(response) else chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except (aiohttp.ClientError, TimeoutError) as exc:
                logger.warning("upstream failed mid-answer: %s", type(exc).__name__)
                raise errors.engine_failed() from None
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            finished = True
        finally:
            # A whole answer's connection goes back to the pool; any other is closed, which
            # is how an engine learns that its client left.
            response.release() if finished else response.close()


async def _disconnected(receive: Receive) -> bool:
    with contextlib.suppress(Exception):
        while (await receive())["type"] != "http.disconnect":
            pass
        return True
    return False


def _is_stream(response: aiohttp.ClientResponse) -> bool:
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
