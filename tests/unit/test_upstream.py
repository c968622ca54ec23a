"""The relay to an HTTP engine, over httpx's mock transport: what the upstream receives, and
how its failures reach the gateway."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.types import Message

from hermes_serve import errors
from hermes_serve.config import Settings
from hermes_serve.upstream import Upstream

SETTINGS = Settings.model_validate(
    {"model": {"upstream": "http://engines:8000", "upstream_api_key": "upstream-secret"}}
)


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
        self._body = body
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        body, self._body = self._body, b""
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def chunks(self) -> list[bytes]:
        return [m["body"] for m in self.sent[1:] if m.get("body")]


async def relay(handler: httpx.MockTransport, client: Client) -> Upstream:
    upstream = Upstream(SETTINGS, transport=handler)
    await upstream(client.scope, client.receive, client.send)
    return upstream


async def test_the_upstream_gets_its_own_credential_and_nothing_hop_by_hop() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True})

    client = Client(b'{"model": "m"}', [(b"x-tenant-id", b"t-1"), (b"connection", b"close"), (b"te", b"trailers")])
    await relay(httpx.MockTransport(answer), client)
    request = seen[0]
    assert str(request.url) == "http://engines:8000/v1/chat/completions" and request.content == b'{"model": "m"}'
    assert request.headers["authorization"] == "Bearer upstream-secret"
    assert request.headers["x-tenant-id"] == "t-1" and "te" not in request.headers
    assert client.status == 200 and json.loads(b"".join(client.chunks)) == {"ok": True}


async def test_an_upstream_5xx_is_a_502_whose_internals_stay_upstream() -> None:
    client = Client()
    await relay(httpx.MockTransport(lambda r: httpx.Response(500, text="Traceback: /srv/engine.py")), client)
    error = errors.from_engine(client.status, b"".join(client.chunks))
    assert (error.status, error.code, error.headers.get("Retry-After")) == (502, "upstream_error", "5")
    assert b"Traceback" not in b"".join(client.chunks)


async def test_an_upstream_that_cannot_be_reached_is_a_503() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client = Client()
    await relay(httpx.MockTransport(refuse), client)
    error = errors.from_engine(client.status, b"".join(client.chunks))
    assert (error.status, error.code, error.headers.get("Retry-After")) == (503, "upstream_unavailable", "5")


@pytest.mark.parametrize(
    "pieces",
    [
        [b'data: {"a":1}\n\ndata: {"b":2}\n\n', b"data: [DONE]\n\n"],  # several events in one read
        [b'data: {"a"', b":1}\n", b'\ndata: {"b":2}\n\nda', b"ta: [DONE]\n\n"],  # events cut anywhere
    ],
)
async def test_a_stream_is_passed_on_one_whole_event_at_a_time(pieces: list[bytes]) -> None:
    async def stream() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream())

    client = Client()
    await relay(httpx.MockTransport(answer), client)
    assert client.chunks == [b'data: {"a":1}\n\n', b'data: {"b":2}\n\n', b"data: [DONE]\n\n"]
    assert client.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


async def test_an_upstream_failing_mid_stream_is_the_engine_failing() -> None:
    async def stream() -> AsyncIterator[bytes]:
        yield b'data: {"a":1}\n\n'
        raise httpx.ReadError("connection reset")

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream())

    client = Client()
    with pytest.raises(errors.OpenAIError) as raised:
        await relay(httpx.MockTransport(answer), client)
    assert raised.value.code == "engine_failed" and client.chunks == [b'data: {"a":1}\n\n']


async def test_readiness_and_models_follow_the_upstream() -> None:
    healthy = {"up": True}

    def answer(request: httpx.Request) -> httpx.Response:
        if not healthy["up"]:
            raise httpx.ConnectError("down", request=request)
        if request.url.path == "/health":
            return httpx.Response(200)
        return httpx.Response(200, json={"data": [{"id": "a"}, {"id": "b"}]})

    upstream = Upstream(SETTINGS, transport=httpx.MockTransport(answer))
    await upstream._probe()
    assert upstream.ready and upstream.served_models == {"a", "b"}
    healthy["up"] = False
    await upstream._probe()
    assert not upstream.ready and upstream.served_models == {"a", "b"}
    await upstream.stop()
