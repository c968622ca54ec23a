"""Token accounting from request and response bodies: what to reserve, what was used.

Pure functions over parsed JSON and raw bytes; the gateway calls them once per request
(and, for streams, a substring test per chunk, which costs nothing next to vLLM's own JSON).
"""

from __future__ import annotations

import json
from typing import Any

from .errors import OpenAIError

BYTES_PER_TOKEN = 4  # a deliberate over-estimate of tokens for English-like text
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def validate_request(route: str, body: Any) -> None:
    """The checks vLLM does not make (it accepts any role); raise a 400 before admission."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_body")
    if route != "/v1/chat/completions":
        return
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, "'messages' must be a non-empty array.", param="messages")
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in CHAT_ROLES:
            raise OpenAIError(
                400,
                f"Invalid role {role!r} in messages[{i}]; expected one of {sorted(CHAT_ROLES)}.",
                param=f"messages[{i}].role",
            )


def estimate_prompt_tokens(body: dict[str, Any], max_model_len: int) -> int:
    prompt = body.get("messages", body.get("prompt", ""))
    prompt_tokens = len(json.dumps(prompt, ensure_ascii=False).encode()) // BYTES_PER_TOKEN + 1
    return min(prompt_tokens, max_model_len)


def estimate_tokens(body: dict[str, Any], max_model_len: int) -> int:
    """Upper-bound guess of prompt + completion tokens, reserved against tokens/min."""
    prompt_tokens = estimate_prompt_tokens(body, max_model_len)
    completion = body.get("max_completion_tokens") or body.get("max_tokens")
    if not isinstance(completion, int) or completion <= 0:
        completion = max_model_len - prompt_tokens
    choices = body.get("n") if isinstance(body.get("n"), int) and body["n"] > 0 else 1
    return prompt_tokens + max(completion, 1) * choices


def request_usage_in_stream(body: dict[str, Any]) -> bool:
    """Ask vLLM for the usage chunk so tokens can be settled; returns whether the client asked."""
    options = body.get("stream_options")
    client_asked = isinstance(options, dict) and bool(options.get("include_usage"))
    if not client_asked:
        body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return client_asked


def usage_from_json(payload: bytes) -> int | None:
    try:
        usage = json.loads(payload).get("usage")
    except (ValueError, AttributeError):
        return None
    return _total(usage)


def usage_from_sse_chunk(chunk: bytes) -> int | None:
    """Total tokens if ``chunk`` is vLLM's final usage event (no choices, a usage object)."""
    if b'"usage":{' not in chunk or b'"choices":[]' not in chunk:
        return None
    data = chunk.strip()
    if not data.startswith(b"data: "):
        return None
    return usage_from_json(data[len(b"data: ") :])


def _total(usage: Any) -> int | None:
    if not isinstance(usage, dict):
        return None
    total = usage.get("total_tokens")
    return total if isinstance(total, int) else None
