"""The one place errors are built, in OpenAI's vocabulary, and sent in each API's shape.

Every error the gateway raises or relays is an ``OpenAIError`` (status, message, OpenAI's
``type`` and ``code``). A ``Dialect`` writes it the way the route's SDK expects: OpenAI's
``{"error": {"message", "type", "param", "code"}}``, or Anthropic's
``{"type": "error", "error": {"type", "message"}}``; and, once a stream has started, as the
last event of that API's stream.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

from starlette.types import Send


@dataclass(eq=False)  # not frozen: Python sets __traceback__ on raised exceptions
class OpenAIError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def encode(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


class Dialect:
    """OpenAI's error shape; chat and completions streams end with an error chunk and [DONE]."""

    def body(self, error: OpenAIError) -> dict[str, Any]:
        return error.body()

    def stream_end(self, error: OpenAIError, events_sent: int) -> bytes:
        """The frames that end a stream that has already started."""
        return b"data: " + encode(self.body(error)) + b"\n\ndata: [DONE]\n\n"


class ResponsesDialect(Dialect):
    """The Responses API ends a stream with its own ``error`` event (and no [DONE])."""

    def stream_end(self, error: OpenAIError, events_sent: int) -> bytes:
        event = {
            "type": "error",
            "code": error.code,
            "message": error.message,
            "param": error.param,
            "sequence_number": events_sent,
        }
        return b"event: error\ndata: " + encode(event) + b"\n\n"


class AnthropicDialect(Dialect):
    """Anthropic's shape, so its SDK raises its own exceptions: the type follows the status."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        503: "overloaded_error",
        504: "timeout_error",
    }

    def body(self, error: OpenAIError) -> dict[str, Any]:
        kind = self.TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": error.message}}

    def stream_end(self, error: OpenAIError, events_sent: int) -> bytes:
        return b"event: error\ndata: " + encode(self.body(error)) + b"\n\n"


OPENAI, RESPONSES, ANTHROPIC = Dialect(), ResponsesDialect(), AnthropicDialect()


async def send_error(
    send: Send, error: OpenAIError, extra_headers: dict[str, str] | None = None, dialect: Dialect = OPENAI
) -> None:
    """Send ``error`` as a complete JSON response (only before a response has started)."""
    payload = encode(dialect.body(error))
    headers = {**(extra_headers or {}), **error.headers}
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()),
    ]
    await send({"type": "http.response.start", "status": error.status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


def from_engine(status: int, payload: bytes, model: str | None = None) -> OpenAIError:
    """An engine error in OpenAI's vocabulary. vLLM's own errors carry a class name as their
    type (``NotFoundError``) and the status as their code; FastAPI's are ``{"detail": ...}``;
    a 5xx never shows its internals."""
    if status == 422:  # FastAPI's answer to a malformed field is a 400 in the OpenAI API
        status = 400
    try:
        body = json.loads(payload)
    except ValueError:
        body = None
    if status >= 500:
        return internal_error(status)
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and "message" in error:
        message = str(error["message"])
        param = error.get("param") if isinstance(error.get("param"), str) else None
    else:
        detail = body.get("detail") if isinstance(body, dict) else None
        message = detail if isinstance(detail, str) else json.dumps(detail) if detail else "Bad request."
        param = None
    if status == 404:  # the engine's only 404: a model (or adapter) it does not serve
        # vLLM's message lists every model it serves: ours names only the one asked for.
        return model_not_found(model) if model else OpenAIError(404, message, code="model_not_found", param="model")
    return OpenAIError(status, message, param=param)


# The errors the gateway itself raises, named once so messages and codes stay consistent.


def invalid_api_key() -> OpenAIError:
    return OpenAIError(
        401,
        "Incorrect or missing API key. Send it as 'Authorization: Bearer YOUR_KEY' (or 'x-api-key: YOUR_KEY').",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def key_expired() -> OpenAIError:
    return OpenAIError(401, "This API key has expired.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def key_revoked() -> OpenAIError:
    return OpenAIError(
        401,
        "This API key was revoked while the request waited.",
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


def larger_than_limit(tokens: int, setting: str, limit: int, key_name: str) -> OpenAIError:
    """A request that could never fit: waiting does not help, so no Retry-After."""
    budget = not setting.endswith("_per_minute")
    return OpenAIError(
        429,
        f"Request too large for key '{key_name}': it may use {tokens} tokens but the key's "
        f"{setting} is {limit}. Lower max_tokens or the prompt.",
        type="insufficient_quota" if budget else "tokens",
        code="insufficient_quota" if budget else "rate_limit_exceeded",
        headers={"x-should-retry": "false"},
    )


def insufficient_quota(setting: str, limit: int, key_name: str, frees_at: float, now: float) -> OpenAIError:
    """A day or month budget used up. The SDKs' automatic retries cannot help before it frees
    (``x-should-retry: false``); Retry-After says when it does."""
    when = datetime.fromtimestamp(frees_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return OpenAIError(
        429,
        f"Key '{key_name}' has used its {setting} budget ({limit}); it frees at {when}.",
        type="insufficient_quota",
        code="insufficient_quota",
        headers={"Retry-After": str(max(1, math.ceil(frees_at - now))), "x-should-retry": "false"},
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


def limits_unavailable() -> OpenAIError:
    return OpenAIError(
        503,
        "This key's limits cannot be checked: their shared storage is unreachable. Retry shortly.",
        type="server_error",
        code="limits_unavailable",
        headers={"Retry-After": "5"},
    )


def engine_failed() -> OpenAIError:
    return OpenAIError(
        503,
        "The engine failed while generating this answer (it restarts by itself). Retry shortly.",
        type="server_error",
        code="engine_failed",
        headers={"Retry-After": "5"},
    )


def queue_timeout(waited_s: float, retry_after_s: int) -> OpenAIError:
    return OpenAIError(
        504,
        f"The request waited {waited_s:.0f}s in the queue without being served.",
        type="timeout_error",
        code="queue_timeout",
        headers={"Retry-After": str(retry_after_s)},
    )


def request_timeout(limit_s: float) -> OpenAIError:
    # Retry-After only says "not at once": the same request may well run as long again.
    return OpenAIError(
        504,
        f"The request did not finish within {limit_s:.0f}s and was aborted.",
        type="timeout_error",
        code="request_timeout",
        headers={"Retry-After": "1"},
    )


def not_found(path: str) -> OpenAIError:
    return OpenAIError(404, f"Unknown route: {path}", code="not_found")


def method_not_allowed(method: str, path: str, allowed: frozenset[str]) -> OpenAIError:
    return OpenAIError(
        405,
        f"Method {method} is not allowed on {path}",
        code="method_not_allowed",
        headers={"Allow": ", ".join(sorted(allowed))},
    )


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(404, f"The model `{model}` does not exist.", code="model_not_found", param="model")


def response_not_stored() -> OpenAIError:
    return OpenAIError(
        404,
        "Responses are not stored on this server (store is always off), so they cannot be "
        "retrieved, cancelled or deleted. Keep the response you received.",
        code="response_not_found",
    )


def previous_response_unsupported() -> OpenAIError:
    return OpenAIError(
        400,
        "previous_response_id is not supported: this server does not store responses. "
        "Send the whole conversation in 'input' instead.",
        code="unsupported_parameter",
        param="previous_response_id",
    )


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
