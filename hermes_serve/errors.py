"""The one place OpenAI-shaped errors are built and sent.

Body: ``{"error": {"message", "type", "param", "code"}}``, as OpenAI and vLLM send it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Send


@dataclass(eq=False)  # not frozen: Python sets __traceback__ on raised exceptions
class OpenAIError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | int | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str, code: str | int | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def encode(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


async def send_error(send: Send, error: OpenAIError, extra_headers: dict[str, str] | None = None) -> None:
    """Send ``error`` as a complete JSON response (only before a response has started)."""
    payload = encode(error.body())
    headers = {**(extra_headers or {}), **error.headers}
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()),
    ]
    await send({"type": "http.response.start", "status": error.status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


def sse_error_frame(error: OpenAIError) -> bytes:
    """The frame that ends a stream that has already started: an error event, then [DONE]."""
    return b"data: " + encode(error.body()) + b"\n\ndata: [DONE]\n\n"


# The errors the gateway itself raises, named once so messages and codes stay consistent.


def invalid_api_key() -> OpenAIError:
    return OpenAIError(
        401,
        "Incorrect or missing API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def rate_limited(what: str, limit: int, retry_after_s: int, key_name: str) -> OpenAIError:
    return OpenAIError(
        429,
        f"Rate limit reached for key '{key_name}' on {what} per minute: limit {limit}. Try again in {retry_after_s}s.",
        type=what,
        code="rate_limit_exceeded",
        headers={"Retry-After": str(retry_after_s)},
    )


def over_request_budget(tokens: int, limit: int, key_name: str) -> OpenAIError:
    return OpenAIError(
        429,
        f"Request too large for key '{key_name}': it may use {tokens} tokens but the key's "
        f"limit is {limit} tokens per minute. Lower max_tokens or the prompt.",
        type="tokens",
        code="rate_limit_exceeded",
    )


def server_overloaded(retry_after_s: int) -> OpenAIError:
    return OpenAIError(
        503,
        "The server is overloaded: the request queue is full. Retry later.",
        type="server_error",
        code="server_overloaded",
        headers={"Retry-After": str(retry_after_s)},
    )


def not_ready() -> OpenAIError:
    return OpenAIError(
        503,
        "The model is not ready yet.",
        type="server_error",
        code="model_not_ready",
        headers={"Retry-After": "5"},
    )


def queue_timeout(waited_s: float) -> OpenAIError:
    return OpenAIError(
        504,
        f"The request waited {waited_s:.0f}s in the queue without being served.",
        type="timeout_error",
        code="queue_timeout",
    )


def request_timeout(limit_s: float) -> OpenAIError:
    return OpenAIError(
        504,
        f"The request did not finish within {limit_s:.0f}s and was aborted.",
        type="timeout_error",
        code="request_timeout",
    )


def not_found(path: str) -> OpenAIError:
    return OpenAIError(404, f"Unknown route: {path}", code="not_found")


def method_not_allowed(method: str, path: str) -> OpenAIError:
    return OpenAIError(405, f"Method {method} is not allowed on {path}", code="method_not_allowed")


def body_too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"Request body is larger than {limit} bytes.", code="request_too_large")


def bad_json(detail: str) -> OpenAIError:
    return OpenAIError(400, f"The request body is not valid JSON: {detail}", code="invalid_json")


CLIENT_CLOSED_REQUEST = "client_closed_request"


def client_closed_request() -> OpenAIError:
    # nginx's 499: logged and counted, though the client that left never reads it.
    return OpenAIError(499, "The client closed the request before it was answered.", code=CLIENT_CLOSED_REQUEST)


def internal_error(status: int = 500) -> OpenAIError:
    return OpenAIError(status, "Internal server error.", type="server_error", code="internal_error")
