"""A stand-in for vLLM's OpenAI app, for gateway unit tests only (the e2e tier uses vLLM).

It answers each API in vLLM's own framing: chat and completions as ``data:`` chunks ending in
``[DONE]`` (a usage chunk when asked), the Responses API as ``event:`` frames with usage in
``response.completed``, and Anthropic Messages with usage split over ``message_start`` and
``message_delta``.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
MODEL_ROOT = "/srv/secret/models/fake"  # a server path that must never reach clients


@dataclass
class FakeEngine:
    """Answers like vLLM: JSON with usage, or SSE chunks.

    ``delay_s`` is the time per chunk; ``cancelled`` counts requests cut short (vLLM aborts
    the engine request exactly when its handler is cancelled).
    """

    delay_s: float = 0.0
    chunks: int = 3
    cancelled: int = 0
    running: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope["path"]
        self.headers.append({k.decode().lower(): v.decode() for k, v in scope["headers"]})
        if path == "/v1/models":
            model = {"id": "fake", "object": "model", "owned_by": "vllm", "root": MODEL_ROOT, "parent": None}
            return await self._json(send, 200, {"object": "list", "data": [model]})
        message = await receive()
        body = json.loads(message["body"])
        self.bodies.append(body)
        if path == "/v1/messages/count_tokens":
            return await self._json(send, 200, {"input_tokens": 7})
        if body.get("model") == "dies" and not body.get("stream"):  # vLLM's answer when its engine died
            error = {
                "message": "EngineCore encountered an issue. See stack trace (above).",
                "type": "InternalServerError",
                "code": 500,
            }
            return await self._json(send, 500, {"error": error})
        if body.get("model") == "broken":
            return await self._text(send, 500, b"Traceback (most recent call last): secret internals")
        if body.get("model") == "unvalidated":
            return await self._json(send, 422, {"detail": [{"loc": ["body", "x"], "msg": "field required"}]})
        if body.get("model") == "missing":
            error = {"message": "The model `missing` does not exist.", "type": "NotFoundError", "code": 404}
            if path.startswith("/v1/messages"):  # vLLM's Anthropic router keeps its own words
                return await self._json(send, 404, {"type": "error", "error": error})
            return await self._json(send, 404, {"error": {**error, "param": "model"}})
        # Like vLLM: the handler runs in its own task and is cancelled only when a disconnect
        # arrives through `receive` (vLLM's with_cancellation, Starlette's StreamingResponse
        # on ASGI spec 2.3). Cancelling the caller alone would leave it running.
        handler = asyncio.create_task(self._handle(send, path, body))
        listener = asyncio.create_task(self._disconnect(receive))
        done, pending = await asyncio.wait({handler, listener}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if handler not in done:
            await FakeEngine._json(send, 200, None)  # what FastAPI sends for a cancelled handler

    async def _handle(self, send: Any, path: str, body: dict[str, Any]) -> None:
        self.running += 1
        try:
            if body.get("stream"):
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
                    }
                )
                for frame in FRAMES[path](self, body):
                    if frame is None:
                        await asyncio.sleep(self.delay_s)
                    else:
                        await send({"type": "http.response.body", "body": frame, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                await asyncio.sleep(self.delay_s * self.chunks)
                await self._json(send, 200, ANSWERS[path])
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1

    @staticmethod
    async def _disconnect(receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    @staticmethod
    async def _json(send: Any, status: int, data: Any) -> None:
        await FakeEngine._raw(send, status, b"application/json", json.dumps(data).encode())

    @staticmethod
    async def _text(send: Any, status: int, data: bytes) -> None:
        await FakeEngine._raw(send, status, b"text/plain", data)

    @staticmethod
    async def _raw(send: Any, status: int, content_type: bytes, payload: bytes) -> None:
        headers = [(b"content-type", content_type), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


DELAY = None  # a pause of delay_s between frames


def _data(data: Any) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\n".encode() + _data({"type": name, **data})


def _chat_frames(engine: FakeEngine, body: dict[str, Any]) -> list[bytes | None]:
    frames = [
        f
        for i in range(engine.chunks)
        for f in (DELAY, _data({"choices": [{"index": 0, "delta": {"content": f"t{i}"}}]}))
    ]
    if body.get("model") == "dies":  # vLLM's last words in a stream when its engine died
        error = {
            "message": "EngineCore encountered an issue. See stack trace (above).",
            "type": "InternalServerError",
            "code": 500,
        }
        return [*frames, _data({"error": error}), b"data: [DONE]\n\n"]
    if (body.get("stream_options") or {}).get("include_usage"):
        frames.append(_data({"choices": [], "usage": USAGE}))
    return [*frames, b"data: [DONE]\n\n"]


RESPONSES_USAGE = {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}
MESSAGES_USAGE = {"input_tokens": 10, "output_tokens": 5}


def _responses_frames(engine: FakeEngine, body: dict[str, Any]) -> list[bytes | None]:
    deltas = [
        f for i in range(engine.chunks) for f in (DELAY, _event("response.output_text.delta", {"delta": f"t{i}"}))
    ]
    completed = {"response": {"id": "resp_1", "status": "completed", "usage": RESPONSES_USAGE}}
    return [
        _event("response.created", {"response": {"id": "resp_1"}}),
        *deltas,
        _event("response.completed", completed),
    ]


def _messages_frames(engine: FakeEngine, body: dict[str, Any]) -> list[bytes | None]:
    deltas = [
        f
        for i in range(engine.chunks)
        for f in (DELAY, _event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": f"t{i}"}}))
    ]
    start = {
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "usage": {"input_tokens": 10, "output_tokens": 0},
        }
    }
    return [
        _event("message_start", start),
        _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        *deltas,
        _event("content_block_stop", {"index": 0}),
        _event("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": MESSAGES_USAGE}),
        _event("message_stop", {}),
    ]


FRAMES = {
    "/v1/chat/completions": _chat_frames,
    "/v1/completions": _chat_frames,
    "/v1/responses": _responses_frames,
    "/v1/messages": _messages_frames,
}
ANSWERS: dict[str, Any] = {
    "/v1/chat/completions": {"choices": [{"message": {"content": "hi"}}], "usage": USAGE},
    "/v1/completions": {"choices": [{"text": "hi"}], "usage": USAGE},
    "/v1/responses": {"id": "resp_1", "object": "response", "status": "completed", "usage": RESPONSES_USAGE},
    "/v1/messages": {
        "id": "msg_1",
        "type": "message",
        "content": [{"type": "text", "text": "hi"}],
        "usage": MESSAGES_USAGE,
    },
}
