"""A stand-in for vLLM's OpenAI app, for gateway unit tests only (the e2e tier uses vLLM)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


@dataclass
class FakeEngine:
    """Answers like vLLM: JSON with usage, or SSE chunks (+ a usage event when asked).

    ``delay_s`` is the time per chunk; ``cancelled`` counts requests cut short (vLLM aborts
    the engine request exactly when its handler is cancelled).
    """

    delay_s: float = 0.0
    chunks: int = 3
    cancelled: int = 0
    running: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope["path"]
        if path == "/v1/models":
            return await self._json(send, 200, {"object": "list", "data": [{"id": "fake"}]})
        message = await receive()
        body = json.loads(message["body"])
        self.bodies.append(body)
        if body.get("model") == "broken":
            return await self._text(send, 500, b"Traceback (most recent call last): secret internals")
        if body.get("model") == "unvalidated":
            return await self._json(send, 422, {"detail": [{"loc": ["body", "x"], "msg": "field required"}]})
        if body.get("model") == "missing":
            error = {"message": "The model `missing` does not exist.", "type": "NotFoundError", "param": "model", "code": 404}
            return await self._json(send, 404, {"error": error})
        # Like vLLM: the handler runs in its own task and is cancelled only when a disconnect
        # arrives through `receive` (vLLM's with_cancellation, Starlette's StreamingResponse
        # on ASGI spec 2.3). Cancelling the caller alone would leave it running.
        handler = asyncio.create_task(self._handle(send, body))
        listener = asyncio.create_task(self._disconnect(receive))
        done, pending = await asyncio.wait({handler, listener}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if handler not in done:
            await FakeEngine._json(send, 200, None)  # what FastAPI sends for a cancelled handler

    async def _handle(self, send: Any, body: dict[str, Any]) -> None:
        self.running += 1
        try:
            if body.get("stream"):
                await self._stream(send, body)
            else:
                await asyncio.sleep(self.delay_s * self.chunks)
                await self._json(send, 200, {"choices": [{"message": {"content": "hi"}}], "usage": USAGE})
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1

    @staticmethod
    async def _disconnect(receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def _stream(self, send: Any, body: dict[str, Any]) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i in range(self.chunks):
            await asyncio.sleep(self.delay_s)
            chunk = {"choices": [{"index": 0, "delta": {"content": f"t{i}"}}]}
            await self._event(send, chunk)
        if (body.get("stream_options") or {}).get("include_usage"):
            await self._event(send, {"choices": [], "usage": USAGE})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    @staticmethod
    async def _event(send: Any, data: dict[str, Any]) -> None:
        payload = b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
        await send({"type": "http.response.body", "body": payload, "more_body": True})

    @staticmethod
    async def _json(send: Any, status: int, data: Any) -> None:
        await FakeEngine._raw(send, status, b"application/json", json.dumps(data).encode())

    @staticmethod
    async def _text(send: Any, status: int, data: bytes) -> None:
        await FakeEngine._raw(send, status, b"text/plain", data)

    @staticmethod
    async def _raw(send: Any, status: int, content_type: bytes, payload: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]})
        await send({"type": "http.response.body", "body": payload})
