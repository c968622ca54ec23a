"""What the client of one request is sent: the gateway's own answers, the engine's (relayed,
``relay``) and every error go through its ``Reply``, so one flag says whether the response has
started.

An error is a whole response before the first byte, and after it the last frame of the API's
stream. Once the answer is over (its last message sent, or an error ended it), nothing more
is sent. The request's record learns the status sent and the error the request ended with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.types import Message, Send

from . import errors
from .errors import Dialect, OpenAIError
from .record import Record


class Reply:
    def __init__(self, send: Send, record: Record, dialect: Dialect = errors.OPENAI) -> None:
        self._send = send
        self._record = record
        self._dialect = dialect
        self._headers = {"x-request-id": record.request_id}
        self._started = False
        self._over = False
        self._events = 0  # SSE events sent: a Responses stream numbers its error event after them

    @property
    def started(self) -> bool:
        """Whether the client has seen the response start."""
        return self._started

    @property
    def over(self) -> bool:
        """Whether the answer has ended: nothing more is sent."""
        return self._over

    def add_headers(self, headers: Mapping[str, str]) -> None:
        """Sent with every answer from now on (the key's rate-limit standing, once admitted)."""
        self._headers.update(headers)

    async def send(self, message: Message) -> None:
        """One message of the answer; a response's start gains the reply's headers."""
        if message["type"] == "http.response.start":
            extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self._headers.items()]
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await self._deliver(message)

    async def respond(self, status: int, body: Any) -> None:
        await self.respond_raw(status, errors.encode(body), {"content-type": "application/json"})

    async def respond_raw(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        raw.append((b"content-length", str(len(payload)).encode()))
        await self.send({"type": "http.response.start", "status": status, "headers": raw})
        await self.send({"type": "http.response.body", "body": payload})

    async def fail(self, error: OpenAIError) -> None:
        """End the answer with ``error``: a whole response before the first byte, else the
        last frame of the API's stream."""
        if self._over:
            return
        self._record.end(error.code or "error")
        if not self.started:
            await errors.send_error(self._deliver, error, self._headers, self._dialect)
            return
        end = self._dialect.stream_end(error, self._events)
        await self._deliver({"type": "http.response.body", "body": end, "more_body": False})

    async def finish(self) -> None:
        """Every request gets an answer, even one nobody is left to read: BentoML's timeout
        middleware waits for a first byte, and would hold the request (and a graceful
        shutdown) until traffic.timeout otherwise."""
        if not self.started:
            await self.fail(errors.client_closed_request())

    async def _deliver(self, message: Message) -> None:
        if self._over:
            return
        if message["type"] == "http.response.start":
            self._started = True
            self._record.status = message["status"]
        elif message.get("more_body", False):
            self._events += message.get("body", b"").count(b"data: ")
        else:
            self._over = True
        await self._send(message)
