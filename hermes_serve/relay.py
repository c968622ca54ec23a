"""The engine's answer to one request, relayed to the client in the mode its start announces.

- ``Buffered``: an error or a JSON answer, read whole. An error is answered in the API's own
  shape; a JSON answer's usage is read, and some routes rewrite the answer (``transform``).
- ``Streamed``: server-sent events, passed on chunk by chunk past the API's ``Meter``.

``Relay`` is the ASGI ``send`` the engine answers into; it picks the mode. Once the gateway
gives up on the engine (``detach``), the engine's late output is dropped. A generation's last
message waits (``hold_end``) until ``release``: the gateway settles its tokens first, so a
client that has its whole answer already sees them in its standing.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import Message

from . import errors
from .apis import Meter
from .errors import OpenAIError
from .reply import Reply

Transform = Callable[[Any], Any]
"""Rewrites a successful JSON answer (the model list...); may raise an OpenAIError."""
End = Callable[..., Awaitable[None]]
"""Sends an answer's last messages, or holds them."""


class Buffered:
    """An error or a JSON answer: read whole, then answered."""

    def __init__(
        self,
        reply: Reply,
        meter: Meter,
        end: End,
        model: str | None,
        transform: Transform | None,
        engine_alive: Callable[[], bool],
    ) -> None:
        self._reply = reply
        self._meter = meter
        self._end = end
        self._model = model
        self._transform = transform
        self._engine_alive = engine_alive
        self._start: Message = {}
        self._chunks: list[bytes] = []
        self.refused = False
        """Whether the engine answered with an error (it then reports no usage)."""

    async def start(self, start: Message) -> None:
        self._start = start  # sent with the body, once read: its length may change
        self.refused = start["status"] >= 400

    async def body(self, chunk: bytes, more: bool) -> None:
        self._chunks.append(chunk)
        if not more:
            await self._answer(b"".join(self._chunks))

    async def _answer(self, payload: bytes) -> None:
        status, start = self._start["status"], self._start
        if self.refused:
            if status >= 500 and not self._engine_alive():
                return await self._reply.fail(errors.not_ready())  # the engine died under this request
            return await self._reply.fail(errors.from_engine(status, payload, self._model))
        self._meter.read_json(payload)
        if self._transform is not None:
            try:
                payload = errors.encode(self._transform(json.loads(payload)))
            except OpenAIError as error:
                return await self._reply.fail(error)
            headers = MutableHeaders(raw=list(start.get("headers", [])))
            headers["content-length"] = str(len(payload))
            start = {**start, "headers": headers.raw}
        await self._end(start, {"type": "http.response.body", "body": payload})


class Streamed:
    """Server-sent events: each chunk (one event: vLLM sends one per message) goes on as it
    comes, unless the meter keeps it (a usage event the client did not ask for)."""

    refused = False

    def __init__(self, reply: Reply, meter: Meter, end: End) -> None:
        self._reply = reply
        self._meter = meter
        self._end = end

    async def start(self, start: Message) -> None:
        await self._reply.send(start)

    async def body(self, chunk: bytes, more: bool) -> None:
        if chunk.startswith(self._meter.error_event):
            # vLLM's own words for a failure mid-answer (its engine died...): ours instead.
            return await self._reply.fail(errors.engine_failed())
        passed = self._meter.feed(chunk)
        if not more and self._meter.usage is None:
            # Every stream the gateway asks for ends with its usage: one without was cut short
            # (an engine, or the connection to it, died), however cleanly it closed.
            if passed and chunk:
                await self._reply.send({"type": "http.response.body", "body": chunk, "more_body": True})
            return await self._reply.fail(errors.engine_failed())
        if passed:
            message = {"type": "http.response.body", "body": chunk, "more_body": more}
            await (self._reply.send(message) if more else self._end(message))
        elif not more:
            await self._end({"type": "http.response.body", "body": b""})


def streams(start: Message) -> bool:
    """Whether an answer's start opens a stream (an error never does: it is rewritten whole)."""
    content_type = Headers(raw=start.get("headers", [])).get("content-type", "")
    return bool(start["status"] < 400 and content_type.startswith("text/event-stream"))


class Relay:
    """What the engine answers one request into (``send``), relayed to ``reply``. ``model``:
    the one the request named, for the engine's 404; ``hold_end``: keep the answer's last
    messages until ``release``; ``engine_alive``: tells a 5xx of a dead engine from another."""

    def __init__(
        self,
        reply: Reply,
        meter: Meter | None = None,
        *,
        model: str | None = None,
        transform: Transform | None = None,
        hold_end: bool = False,
        engine_alive: Callable[[], bool] = lambda: True,
    ) -> None:
        self._reply = reply
        self._meter = meter or Meter()
        self._model = model
        self._transform = transform
        self._hold_end = hold_end
        self._engine_alive = engine_alive
        self._mode: Buffered | Streamed | None = None
        self._held: list[Message] = []
        self._detached = False

    @property
    def refused(self) -> bool:
        """Whether the engine answered with an error (it then reports no usage)."""
        return self._mode is not None and self._mode.refused

    async def send(self, message: Message) -> None:
        """The engine's ASGI ``send``."""
        if self._detached or self._reply.over:
            return
        if message["type"] == "http.response.start":
            if streams(message):
                self._mode = Streamed(self._reply, self._meter, self._end)
            else:
                self._mode = Buffered(
                    self._reply, self._meter, self._end, self._model, self._transform, self._engine_alive
                )
            await self._mode.start(message)
        elif self._mode is not None:
            await self._mode.body(message.get("body", b""), message.get("more_body", False))

    def detach(self) -> None:
        """Ignore whatever the engine still sends: the gateway answers from here on."""
        self._detached = True

    async def release(self) -> None:
        """Send the last messages held (the gateway calls this once the tokens are settled)."""
        held, self._held = self._held, []
        for message in held:
            await self._reply.send(message)

    async def _end(self, *messages: Message) -> None:
        if self._hold_end:
            self._held = list(messages)
            return
        for message in messages:
            await self._reply.send(message)
