"""The relay to an HTTP engine, against a real local HTTP server (aiohttp's): what the upstream
receives, and how its failures reach the gateway."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from starlette.types import Message

from hermes_serve import errors
from hermes_serve.config import Settings
from hermes_serve.upstream import Upstream

# A real socket: its timeouts are loop timers, which virtual time would fire at once.
pytestmark = pytest.mark.looptime(False)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def settings(url: str) -> Settings:
    return Settings.model_validate({"model": {"upstream": url, "upstream_api_key": "upstream-secret"}})


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """Serves a handler on a free local port; its base URL."""
    started: list[TestServer] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        server = TestServer(app)
        await server.start_server()
        started.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in started:
        await server.close()


class Client:
    """One ASGI request to the relay and everything it sent back."""

    def __init__(self, body: bytes = b"{}", headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "headers": headers or [],
        }
        self._body: bytes | None = body
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        if self._body is None:  # the body is read: as a server, nothing more until the client leaves
            await asyncio.Event().wait()
        body, self._body = self._body, None
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def chunks(self) -> list[bytes]:
        return [m["body"] for m in self.sent[1:] if m.get("body")]


async def relay(url: str, client: Client) -> Upstream:
    upstream = Upstream(settings(url))
    try:
        await upstream(client.scope, client.receive, client.send)
    finally:
        await upstream.stop()
    return upstream


async def test_the_upstream_gets_its_own_credential_and_nothing_hop_by_hop(
    serve: Callable[..., Awaitable[str]],
) -> None:
    seen: list[tuple[str, dict[str, str], bytes]] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append((request.path_qs, dict(request.headers), await request.read()))
        return web.json_response({"ok": True})

    client = Client(b'{"model": "m"}', [(b"x-tenant-id", b"t-1"), (b"connection", b"close"), (b"te", b"trailers")])
    client.scope["query_string"] = b"a=1&b=%20"
    await relay(await serve(answer), client)
    path, headers, body = seen[0]
    assert path == "/v1/chat/completions?a=1&b=%20" and body == b'{"model": "m"}'
    lower = {name.lower(): value for name, value in headers.items()}
    assert lower["authorization"] == "Bearer upstream-secret"
    assert lower["x-tenant-id"] == "t-1" and "te" not in lower
    assert client.status == 200 and json.loads(b"".join(client.chunks)) == {"ok": True}


async def test_an_upstream_5xx_is_a_502_whose_internals_stay_upstream(serve: Callable[..., Awaitable[str]]) -> None:
    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=500, text="Traceback: /srv/engine.py")

    client = Client()
    await relay(await serve(fail), client)
    error = errors.from_engine(client.status, b"".join(client.chunks))
    assert (error.status, error.code, error.headers.get("Retry-After")) == (502, "upstream_error", "5")
    assert b"Traceback" not in b"".join(client.chunks)


async def test_an_upstream_that_cannot_be_reached_is_a_503(serve: Callable[..., Awaitable[str]]) -> None:
    async def nothing(request: web.Request) -> web.Response:
        return web.Response()

    url = await serve(nothing)
    client = Client()
    await relay(url.rsplit(":", 1)[0] + ":1", client)  # port 1: nothing listens
    error = errors.from_engine(client.status, b"".join(client.chunks))
    assert (error.status, error.code, error.headers.get("Retry-After")) == (503, "upstream_unavailable", "5")


@pytest.mark.parametrize(
    "pieces",
    [
        [b'data: {"a":1}\n\ndata: {"b":2}\n\n', b"data: [DONE]\n\n"],  # several events in one read
        [b'data: {"a"', b":1}\n", b'\ndata: {"b":2}\n\nda', b"ta: [DONE]\n\n"],  # events cut anywhere
    ],
)
async def test_a_stream_is_passed_on_one_whole_event_at_a_time(
    pieces: list[bytes], serve: Callable[..., Awaitable[str]]
) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
            await asyncio.sleep(0.01)  # each piece its own read
        await response.write_eof()
        return response

    client = Client()
    await relay(await serve(answer), client)
    assert client.chunks == [b'data: {"a":1}\n\n', b'data: {"b":2}\n\n', b"data: [DONE]\n\n"]
    assert client.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


async def test_an_upstream_failing_mid_stream_is_the_engine_failing(serve: Callable[..., Awaitable[str]]) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"a":1}\n\n')
        assert request.transport is not None
        request.transport.close()  # the engine's process dies
        return response

    client = Client()
    with pytest.raises(errors.OpenAIError) as raised:
        await relay(await serve(answer), client)
    assert raised.value.code == "engine_failed" and client.chunks == [b'data: {"a":1}\n\n']


async def test_readiness_and_models_follow_the_upstream(serve: Callable[..., Awaitable[str]]) -> None:
    healthy = {"up": True}

    async def answer(request: web.Request) -> web.Response:
        if not healthy["up"]:
            return web.Response(status=503)
        if request.path == "/health":
            return web.Response()
        return web.json_response({"data": [{"id": "a"}, {"id": "b"}]})

    upstream = Upstream(settings(await serve(answer)))
    await upstream._probe()
    assert upstream.ready and upstream.served_models == {"a", "b"}
    healthy["up"] = False
    await upstream._probe()
    assert not upstream.ready and upstream.served_models == {"a", "b"}
    await upstream.stop()
