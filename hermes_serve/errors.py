"""The one place errors are built, in OpenAI's vocabulary, and sent in each API's shape.

Every error the gateway raises or relays is an ``OpenAIError`` (status, message, OpenAI's
``type`` and ``code``). A ``Dialect`` writes it the way the route's SDK expects: OpenAI's
``{"error": {"message", "type", "param", "code"}}``, or Anthropic's
``{"type": "error", "error": {"type", "message"}}``; and, once a stream has started, as the
last event of that API's stream.

Every code the gateway answers with is one row of ``CODES``: its status, its type in each
API, its ``Retry-After``, and whether it counts as a refusal. The factories below build from
it, both dialects read it, the access record counts refusals from it, and the README's table
of errors is generated from it (``python -m hermes_serve.errors table``).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
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


@dataclass(frozen=True)
class Code:
    """One error code: how it answers, in each API's words."""

    status: int
    openai_types: tuple[str, ...]
    """OpenAI's ``type``: the first, unless the error names another of these."""
    anthropic_type: str
    when: str
    retry_after: int | str | None = None
    """Always these seconds; or, as text, how the factory works them out (it may send none);
    ``None``: never sent."""
    refusal: bool = False
    """The gateway refusing or cutting a request by its own policy (a key, a limit, capacity,
    time), not for what the request says: counted in ``hermes_rejections_total``."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Sent with every error of this code."""


INVALID, SERVER, TIMEOUT = ("invalid_request_error",), ("server_error",), ("timeout_error",)
AUTHENTICATE = {"WWW-Authenticate": "Bearer"}
NO_RETRY = {"x-should-retry": "false"}  # the SDKs retry a 429 by themselves unless told not to
DRAIN = "the queue's estimated drain time"

CODES: dict[str, Code] = {
    "invalid_json": Code(400, INVALID, "invalid_request_error", "the body is not JSON, or not UTF-8"),
    "nesting_too_deep": Code(
        400, INVALID, "invalid_request_error", "the body nests arrays or objects over 64 levels deep"
    ),
    "invalid_body": Code(400, INVALID, "invalid_request_error", "the body is not a JSON object"),
    "invalid_type": Code(
        400, INVALID, "invalid_request_error", "`n` or `best_of` is not an integer (`param` says which)"
    ),
    "integer_above_max_value": Code(400, INVALID, "invalid_request_error", "`n` or `best_of` over `server.max_n`"),
    "unsupported_parameter": Code(
        400, INVALID, "invalid_request_error", "`previous_response_id`: responses are never stored"
    ),
    "invalid_client_request_id": Code(
        400,
        INVALID,
        "invalid_request_error",
        "`X-Client-Request-Id` is not 1 to 512 printable ASCII characters, or is sent twice",
    ),
    "invalid_value": Code(
        400, INVALID, "invalid_request_error", "a usage API parameter it cannot serve (`param` says which)"
    ),
    "invalid_api_key": Code(
        401,
        INVALID,
        "authentication_error",
        "a missing, wrong, expired or revoked key, or two different keys in one request",
        refusal=True,
        headers=AUTHENTICATE,
    ),
    "insufficient_permissions": Code(
        403, INVALID, "permission_error", "a key that is not `admin` asked for another key's usage"
    ),
    "not_found": Code(404, INVALID, "not_found_error", "no such route"),
    "usage_not_recorded": Code(404, INVALID, "not_found_error", "the usage API, with `usage.store: none`"),
    "model_not_found": Code(
        404, INVALID, "not_found_error", "no such `model`, or one the key may not use (the same answer)"
    ),
    "response_not_found": Code(404, INVALID, "not_found_error", "a stored response asked for: none is ever stored"),
    "method_not_allowed": Code(
        405, INVALID, "invalid_request_error", "a method the route does not take (`Allow` lists those)"
    ),
    "request_too_large": Code(413, INVALID, "request_too_large", "the body is over `server.max_body_bytes`"),
    "rate_limit_exceeded": Code(
        429,
        ("requests", "tokens"),
        "rate_limit_error",
        "the key is over a per-minute limit",
        retry_after="when the rolling minute has room; none, and `x-should-retry: false`, "
        "for a request larger than the whole limit",
        refusal=True,
    ),
    "insufficient_quota": Code(
        429,
        ("insufficient_quota",),
        "rate_limit_error",
        "the key's day or month budget is used up",
        retry_after="when the budget frees; none for a request larger than the whole budget",
        refusal=True,
        headers=NO_RETRY,
    ),
    "client_closed_request": Code(
        499, INVALID, "invalid_request_error", "the client left first; only logs and metrics see it", refusal=True
    ),
    "internal_error": Code(500, SERVER, "api_error", "the engine failed (or answered another 5xx)"),
    "model_not_ready": Code(
        503,
        SERVER,
        "overloaded_error",
        "the engine is starting or restarting, or died under the request",
        retry_after=5,
        refusal=True,
    ),
    "server_overloaded": Code(
        503, SERVER, "overloaded_error", "the admission queue is full", retry_after=DRAIN, refusal=True
    ),
    "limits_unavailable": Code(
        503,
        SERVER,
        "api_error",
        "the limits storage is unreachable and the key has limits",
        retry_after=5,
        refusal=True,
    ),
    "upstream_error": Code(
        502,
        SERVER,
        "api_error",
        "`model.upstream` answered a 5xx, broke the connection or went silent past its read limit",
        retry_after=5,
    ),
    "upstream_unavailable": Code(503, SERVER, "overloaded_error", "`model.upstream` cannot be reached", retry_after=5),
    "usage_unavailable": Code(
        503, SERVER, "api_error", "the usage store did not answer a read (requests go on)", retry_after=5
    ),
    "engine_failed": Code(
        503, SERVER, "api_error", "the engine failed mid-stream (an error event ends the stream)", retry_after=5
    ),
    "queue_timeout": Code(
        504,
        TIMEOUT,
        "timeout_error",
        "waited past `admission.queue_timeout_s` in the queue",
        retry_after=DRAIN,
        refusal=True,
    ),
    "request_timeout": Code(
        504,
        TIMEOUT,
        "timeout_error",
        "ran past `admission.request_timeout_s` (mid-stream: an error event)",
        retry_after=1,
        refusal=True,
    ),
}
REFUSALS = frozenset(code for code, row in CODES.items() if row.refusal)
ENGINE_ERRORS = (
    "vLLM's own refusals (a bad field, a prompt over the context) keep their 4xx status with code `null`; "
    "their Anthropic type follows the status."
)


def table() -> str:
    """The Markdown table the README shows (``python -m hermes_serve.errors table``)."""
    lines = [
        "| code | status | OpenAI `type` | Anthropic `type` | headers | refusal | when |",
        "|---|---|---|---|---|---|---|",
    ]
    for code, row in CODES.items():
        retry = row.retry_after
        headers = [] if retry is None else [f"`Retry-After`: {f'{retry} s' if isinstance(retry, int) else retry}"]
        headers += [f"`{name}: {value}`" for name, value in row.headers.items()]
        openai = " or ".join(f"`{kind}`" for kind in row.openai_types)
        cells = [f"`{code}`", str(row.status), openai, f"`{row.anthropic_type}`", "; ".join(headers)]
        lines.append("| " + " | ".join([*cells, "yes" if row.refusal else "", row.when]) + " |")
    return "\n".join(lines) + "\n\n" + ENGINE_ERRORS


def when(status: int) -> str:
    """What answers ``status``, in words (the OpenAPI document's descriptions)."""
    causes = [f"`{code}`: {row.when}" for code, row in CODES.items() if row.status == status]
    if status == 400:
        causes.append("code `null`: a field vLLM refuses")
    return "; ".join(causes)


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
    """Anthropic's shape, so its SDK raises its own exceptions: the type is the code's (``CODES``),
    or follows the status for an error with no code of ours (the engine's own)."""

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
        row = CODES.get(error.code) if error.code is not None else None
        if row is not None:
            kind = row.anthropic_type
        else:
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
        error = body.get("error") if isinstance(body, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        if isinstance(error, dict) and code in UPSTREAM_CODES:  # the relay's own words for an upstream that failed
            return _error(str(code), str(error.get("message")))
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
        return model_not_found(model) if model else _error("model_not_found", message, param="model")
    return OpenAIError(status, message, param=param)


# The errors the gateway itself raises, named once so messages stay consistent; status, types
# and fixed headers come from their code's row.


def _error(
    code: str,
    message: str,
    *,
    param: str | None = None,
    type: str | None = None,
    retry_after_s: int | None = None,
    headers: Mapping[str, str] | None = None,
    status: int | None = None,
) -> OpenAIError:
    row = CODES[code]
    assert type is None or type in row.openai_types, (code, type)
    assert retry_after_s is None or isinstance(row.retry_after, str), f"{code}: its Retry-After is fixed"
    retry = row.retry_after if isinstance(row.retry_after, int) else retry_after_s
    sent = {**row.headers, **(headers or {})}
    if retry is not None:
        sent["Retry-After"] = str(retry)
    return OpenAIError(status or row.status, message, type or row.openai_types[0], code, param, sent)


def invalid_api_key() -> OpenAIError:
    return _error(
        "invalid_api_key",
        "Incorrect or missing API key. Send it as 'Authorization: Bearer YOUR_KEY' (or 'x-api-key: YOUR_KEY').",
    )


def key_expired() -> OpenAIError:
    return _error("invalid_api_key", "This API key has expired.")


def key_revoked() -> OpenAIError:
    return _error("invalid_api_key", "This API key was revoked while the request waited.")


def conflicting_keys() -> OpenAIError:
    return _error(
        "invalid_api_key",
        "Two different API keys were sent, in 'Authorization: Bearer' and in 'x-api-key'. Send one key.",
    )


def rate_limited(what: str, limit: int, retry_after_s: int, key_name: str) -> OpenAIError:
    return _error(
        "rate_limit_exceeded",
        f"Rate limit reached for key '{key_name}' on {what} per minute: limit {limit}. Try again in {retry_after_s}s.",
        type=what,
        retry_after_s=retry_after_s,
    )


def larger_than_limit(tokens: int, setting: str, limit: int, key_name: str) -> OpenAIError:
    """A request that could never fit: waiting does not help, so no Retry-After."""
    budget = not setting.endswith("_per_minute")
    return _error(
        "insufficient_quota" if budget else "rate_limit_exceeded",
        f"Request too large for key '{key_name}': it may use {tokens} tokens but the key's "
        f"{setting} is {limit}. Lower max_tokens or the prompt.",
        type=None if budget else "tokens",
        headers=NO_RETRY,
    )


def insufficient_quota(setting: str, limit: int, key_name: str, frees_at: float, now: float) -> OpenAIError:
    """A day or month budget used up. The SDKs' automatic retries cannot help before it frees
    (``x-should-retry: false``); Retry-After says when it does."""
    frees = datetime.fromtimestamp(frees_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return _error(
        "insufficient_quota",
        f"Key '{key_name}' has used its {setting} budget ({limit}); it frees at {frees}.",
        retry_after_s=max(1, math.ceil(frees_at - now)),
    )


def server_overloaded(retry_after_s: int) -> OpenAIError:
    return _error(
        "server_overloaded",
        "The server is overloaded: the request queue is full. Retry later.",
        retry_after_s=retry_after_s,
    )


def not_ready() -> OpenAIError:
    return _error("model_not_ready", "The model is not ready yet.")


def limits_unavailable() -> OpenAIError:
    return _error(
        "limits_unavailable",
        "This key's limits cannot be checked: their shared storage is unreachable. Retry shortly.",
    )


def invalid_value(message: str, param: str) -> OpenAIError:
    return _error("invalid_value", message, param=param)


def usage_of_other_keys() -> OpenAIError:
    return _error("insufficient_permissions", "This key may read its own usage only (api_key_ids names another key).")


def usage_not_recorded() -> OpenAIError:
    return _error("usage_not_recorded", "Usage is not recorded on this server (usage.store is none).")


def usage_unavailable() -> OpenAIError:
    return _error("usage_unavailable", "The usage store did not answer. Retry shortly.")


UPSTREAM_CODES = ("upstream_error", "upstream_unavailable")


def upstream_unavailable() -> OpenAIError:
    return _error("upstream_unavailable", "The model's engines cannot be reached. Retry shortly.")


def upstream_error() -> OpenAIError:
    return _error("upstream_error", "The model's engine failed to answer. Retry shortly.")


def engine_failed() -> OpenAIError:
    return _error(
        "engine_failed",
        "The engine failed while generating this answer (it restarts by itself). Retry shortly.",
    )


def queue_timeout(waited_s: float, retry_after_s: int) -> OpenAIError:
    return _error(
        "queue_timeout",
        f"The request waited {waited_s:.0f}s in the queue without being served.",
        retry_after_s=retry_after_s,
    )


def request_timeout(limit_s: float) -> OpenAIError:
    # Retry-After only says "not at once": the same request may well run as long again.
    return _error("request_timeout", f"The request did not finish within {limit_s:.0f}s and was aborted.")


def not_found(path: str) -> OpenAIError:
    return _error("not_found", f"Unknown route: {path}")


def method_not_allowed(method: str, path: str, allowed: frozenset[str]) -> OpenAIError:
    return _error(
        "method_not_allowed",
        f"Method {method} is not allowed on {path}",
        headers={"Allow": ", ".join(sorted(allowed))},
    )


def model_not_found(model: str) -> OpenAIError:
    return _error("model_not_found", f"The model `{model}` does not exist.", param="model")


def response_not_stored() -> OpenAIError:
    return _error(
        "response_not_found",
        "Responses are not stored on this server (store is always off), so they cannot be "
        "retrieved, cancelled or deleted. Keep the response you received.",
    )


def previous_response_unsupported() -> OpenAIError:
    return _error(
        "unsupported_parameter",
        "previous_response_id is not supported: this server does not store responses. "
        "Send the whole conversation in 'input' instead.",
        param="previous_response_id",
    )


def body_too_large(limit: int) -> OpenAIError:
    return _error("request_too_large", f"Request body is larger than {limit} bytes.")


def bad_json(detail: str) -> OpenAIError:
    return _error("invalid_json", f"The request body is not valid JSON: {detail}")


def nesting_too_deep(limit: int) -> OpenAIError:
    return _error("nesting_too_deep", f"The request body nests arrays or objects more than {limit} levels deep.")


def invalid_body() -> OpenAIError:
    return _error("invalid_body", "The request body must be a JSON object.")


def invalid_type(param: str, expected: str, value: Any) -> OpenAIError:
    # OpenAI's words for the same mistake, so clients see one vocabulary.
    got = {bool: "a boolean", str: "a string", float: "a number", list: "an array", dict: "an object"}
    found = got.get(type(value), type(value).__name__)
    return _error(
        "invalid_type", f"Invalid type for '{param}': expected {expected}, but got {found} instead.", param=param
    )


def integer_above_max(param: str, maximum: int, value: int) -> OpenAIError:
    return _error(
        "integer_above_max_value",
        f"Invalid '{param}': integer above maximum value. Expected a value <= {maximum}, but got {value} instead.",
        param=param,
    )


def invalid_client_request_id(limit: int) -> OpenAIError:
    return _error(
        "invalid_client_request_id",
        f"X-Client-Request-Id must be one header of 1 to {limit} printable ASCII characters.",
    )


CLIENT_CLOSED_REQUEST = "client_closed_request"


def client_closed_request() -> OpenAIError:
    # nginx's 499: logged and counted, though the client that left never reads it.
    return _error(CLIENT_CLOSED_REQUEST, "The client closed the request before it was answered.")


def internal_error(status: int = 500) -> OpenAIError:
    """Any 5xx of the engine's, without its internals."""
    return _error("internal_error", "Internal server error.", status=status)


def main(argv: list[str]) -> int:
    if argv != ["table"]:
        print("usage: python -m hermes_serve.errors table", file=sys.stderr)
        return 2
    print(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
