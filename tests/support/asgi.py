"""Drive an ASGI app as a server would: one request in, the response collected."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    chunks: list[bytes] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        """The OpenAI error object, checked to have exactly OpenAI's fields."""
        body = self.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        return body["error"]


async def call(
    app: ASGIApp,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    key: str | None = None,
    headers: dict[str, str] | None = None,
    disconnect_after_s: float | None = None,
    on_end: Callable[[], Awaitable[None]] | None = None,
) -> Reply:
    """One request; ``disconnect_after_s`` makes the client leave that long after sending it;
    ``on_end`` runs the moment the response's last message arrives, before the app goes on."""
    payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if key:
        raw_headers.append((b"authorization", f"Bearer {key}".encode()))
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {"type": "http", "method": method, "path": path, "headers": raw_headers, "query_string": b""}
    delivered = False
    response_done = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": payload, "more_body": False}
        if disconnect_after_s is not None:
            await asyncio.sleep(disconnect_after_s)
        else:
            await response_done.wait()
        return {"type": "http.disconnect"}

    start: dict[str, Any] = {}
    chunks: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        else:
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                response_done.set()
                if on_end is not None:
                    await on_end()

    await app(scope, receive, send)
    headers_out = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
    return Reply(start.get("status", 0), headers_out, b"".join(chunks), chunks)


class Sent:
    """An ASGI ``send`` that keeps every message, read back as the client saw them."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def start(self) -> Message:
        return next(m for m in self.messages if m["type"] == "http.response.start")

    @property
    def status(self) -> int:
        return int(self.start["status"])

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode().lower(): v.decode() for k, v in self.start["headers"]}

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")
