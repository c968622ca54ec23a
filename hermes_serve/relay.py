"""The answer to one request: the engine's, relayed, or the gateway's own.

Everything sent to the client goes through here, so one place knows whether a response has
started. Engine errors and JSON answers are buffered (errors are rewritten into the API's
error shape, JSON answers carry usage); streams pass through chunk by chunk past a meter.
Once the gateway gives up on the engine (``detach``), the engine's late output is dropped.
A generation's last message waits (``hold_end``) until the gateway has settled its tokens, so a
client that has its whole answer already sees them in its standing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import Message, Send

from . import errors
from .apis import Meter
from .errors import Dialect, OpenAIError


class Relay:
    def __init__(
        self,
        send: Send,
        request_id: str,
        dialect: Dialect = errors.OPENAI,
        engine_alive: Callable[[], bool] = lambda: True,
    ) -> None:
        self._send = send
        self._dialect = dialect
        self._engine_alive = engine_alive
        self.headers: dict[str, str] = {"x-request-id": request_id}
        """Added to every answer: the request id, the key's rate-limit standing."""
        self.meter = Meter()
        self.model: str | None = None
        """The model the request named, for the engine's 404."""
        self.transform: Callable[[Any], Any] | None = None
        """Rewrites a successful JSON answer (e.g. the model list); may raise an OpenAIError."""
        self.status: int | None = None
        self.outcome = "ok"
        self.started = False
        """Whether the client has seen the response start."""
        self.engine_refused = False
        """Whether the engine answered with an error (it then reports no usage)."""
        self.hold_end = False
        """Keep a successful answer's last message until ``release``."""
        self._held: list[Message] = []
        self._streaming = False
        self._start: Message | None = None
        self._buffer: list[bytes] | None = None
        self._closed = False
        self._detached = False
        self._events_sent = 0

    # --- the engine's answer ----------------------------------------------------------------

    async def engine_send(self, message: Message) -> None:
        if self._closed or self._detached:
            return
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self._streaming = (
                Headers(raw=message.get("headers", [])).get("content-type", "").startswith("text/event-stream")
            )
            if self.status >= 400 or not self._streaming:
                self._start, self._buffer = message, []
                return
            await self._send_start(message)
            return
        chunk: bytes = message.get("body", b"")
        more = message.get("more_body", False)
        if self._buffer is not None:
            self._buffer.append(chunk)
            if not more:
                await self._finish_buffered(b"".join(self._buffer))
            return
        if chunk.startswith(self.meter.error_event):
            # vLLM's own words for a failure mid-answer (its engine died...): ours instead.
            return await self.fail(errors.engine_failed())
        if self.meter.feed(chunk):
            self._events_sent += chunk.count(b"data: ")
            await (self._send(message) if more else self._end(message))
        elif not more:
            await self._end({"type": "http.response.body", "body": b""})

    def detach(self) -> None:
        """Ignore whatever the engine still sends: the gateway answers from here on."""
        self._detached = True

    async def _finish_buffered(self, payload: bytes) -> None:
        assert self._start is not None and self.status is not None
        start = self._start
        if self.status >= 400:
            self.engine_refused = True
            if self.status >= 500 and not self._engine_alive():
                return await self.fail(errors.not_ready())  # the engine died under this request
            return await self.fail(errors.from_engine(self.status, payload, self.model))
        self.meter.read_json(payload)
        if self.transform is not None:
            try:
                payload = errors.encode(self.transform(json.loads(payload)))
            except OpenAIError as error:
                return await self.fail(error)
            headers = MutableHeaders(raw=list(start.get("headers", [])))
            headers["content-length"] = str(len(payload))
            start = {**start, "headers": headers.raw}
        await self._end(self._with_headers(start), {"type": "http.response.body", "body": payload})

    async def _end(self, *messages: Message) -> None:
        """The answer's last messages: held if asked (a whole JSON answer, a stream's end)."""
        if self.hold_end:
            self._held = list(messages)
            return
        for message in messages:
            await self._send_raw(message)

    async def release(self) -> None:
        """Send what ``_end`` held (the gateway calls this once the tokens are settled)."""
        held, self._held = self._held, []
        for message in held:
            await self._send_raw(message)

    # --- the gateway's own answers ----------------------------------------------------------

    async def respond(self, status: int, body: Any) -> None:
        await self.respond_raw(status, errors.encode(body), {"content-type": "application/json"})

    async def respond_raw(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
        self.status = status
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        raw.append((b"content-length", str(len(payload)).encode()))
        await self._send_start({"type": "http.response.start", "status": status, "headers": raw})
        await self._send({"type": "http.response.body", "body": payload})

    async def fail(self, error: OpenAIError) -> None:
        """Answer with ``error``: a whole response before the first byte, else a last SSE frame."""
        if self._closed:
            return
        self._closed = True
        self._held = []  # an answer cut short by a failure ends with the failure instead
        if self.outcome == "ok":  # a client that left stays "client_closed_request"
            self.outcome = error.code or "error"
        if not self.started:
            self.status = error.status
            await errors.send_error(self._send_raw, error, self.headers, self._dialect)
            return
        end = self._dialect.stream_end(error, self._events_sent)
        await self._send_raw({"type": "http.response.body", "body": end, "more_body": False})

    def client_left(self) -> None:
        self.outcome = errors.CLIENT_CLOSED_REQUEST

    async def finish(self) -> None:
        """Every request gets an answer, even one nobody is left to read: BentoML's timeout
        middleware waits for a first byte, and would hold the request (and a graceful
        shutdown) until traffic.timeout otherwise."""
        await self.release()
        if not self.started:
            await self.fail(errors.client_closed_request())

    # --- sending ----------------------------------------------------------------------------

    async def _send_start(self, start: Message) -> None:
        await self._send_raw(self._with_headers(start))

    def _with_headers(self, start: Message) -> Message:
        extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        return {**start, "headers": [*start.get("headers", []), *extra]}

    async def _send_raw(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)
