"""The answer to one request: the engine's, relayed, or the gateway's own.

Everything sent to the client goes through here, so one place knows whether a response has
started. Engine errors and JSON answers are buffered (errors are rewritten into the API's
error shape, JSON answers carry usage); streams pass through chunk by chunk past a meter.
Once the gateway gives up on the engine (``detach``), the engine's late output is dropped.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.datastructures import Headers
from starlette.types import Message, Send

from . import errors
from .apis import Meter
from .errors import OpenAIError


class Relay:
    def __init__(self, send: Send, request_id: str) -> None:
        self._send = send
        self.headers: dict[str, str] = {"x-request-id": request_id}
        """Added to every answer: the request id, the key's rate-limit standing."""
        self.meter = Meter()
        self.status: int | None = None
        self.outcome = "ok"
        self.started = False
        """Whether the client has seen the response start."""
        self.engine_refused = False
        """Whether the engine answered with an error (it then reports no usage)."""
        self._streaming = False
        self._start: Message | None = None
        self._buffer: list[bytes] | None = None
        self._closed = False
        self._detached = False

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
        if self.meter.feed(chunk):
            await self._send(message)
        elif not more:
            await self._send({"type": "http.response.body", "body": b""})

    def detach(self) -> None:
        """Ignore whatever the engine still sends: the gateway answers from here on."""
        self._detached = True

    async def _finish_buffered(self, payload: bytes) -> None:
        assert self._start is not None and self.status is not None
        if self.status >= 400:
            self.engine_refused = True
            self._buffer = None
            return await self.fail(engine_error(self.status, payload))
        self.meter.read_json(payload)
        await self._send_start(self._start)
        await self._send({"type": "http.response.body", "body": payload})

    # --- the gateway's own answers ----------------------------------------------------------

    async def respond(self, status: int, body: Any) -> None:
        self.status = status
        start = {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
        await self._send_start(start)
        await self._send({"type": "http.response.body", "body": errors.encode(body)})

    async def fail(self, error: OpenAIError) -> None:
        """Answer with ``error``: a whole response before the first byte, else a last SSE frame."""
        if self._closed:
            return
        self._closed = True
        if self.outcome == "ok":  # a client that left stays "client_closed_request"
            self.outcome = error.code if isinstance(error.code, str) else "error"
        if not self.started:
            self.status = error.status
            await errors.send_error(self._send_raw, error, self.headers)
            return
        await self._send_raw({"type": "http.response.body", "body": errors.sse_error_frame(error), "more_body": False})

    def client_left(self) -> None:
        self.outcome = errors.CLIENT_CLOSED_REQUEST

    async def finish(self) -> None:
        """Every request gets an answer, even one nobody is left to read: BentoML's timeout
        middleware waits for a first byte, and would hold the request (and a graceful
        shutdown) until traffic.timeout otherwise."""
        if not self.started:
            await self.fail(errors.client_closed_request())

    # --- sending ----------------------------------------------------------------------------

    async def _send_start(self, start: Message) -> None:
        extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        await self._send_raw({**start, "headers": [*start.get("headers", []), *extra]})

    async def _send_raw(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


def engine_error(status: int, payload: bytes) -> OpenAIError:
    """An engine error as the gateway's own: vLLM's are already OpenAI-shaped; FastAPI's
    ``{"detail": ...}`` and others are not; a 5xx never shows its internals."""
    if status == 422:  # FastAPI's answer to a malformed field is a 400 in the OpenAI API
        status = 400
    try:
        body = json.loads(payload)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict) and "message" in body["error"]:
        error = body["error"]
        return OpenAIError(
            status,
            str(error["message"]),
            type=str(error.get("type") or "invalid_request_error"),
            code=error.get("code"),
            param=error.get("param"),
        )
    if status >= 500:
        return errors.internal_error(status)
    detail = body.get("detail") if isinstance(body, dict) else None
    message = detail if isinstance(detail, str) else json.dumps(detail) if detail else "Bad request."
    return OpenAIError(status, message)
