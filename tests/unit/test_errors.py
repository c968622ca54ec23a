from __future__ import annotations

import json

import pytest

from hermes_serve import errors
from hermes_serve.errors import ANTHROPIC, OPENAI, RESPONSES, OpenAIError


def vllm_error(status: int, message: str, kind: str, param: str | None = None) -> bytes:
    """vLLM's own error body: its exception class as the type, the status as the code."""
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}}).encode()


@pytest.mark.parametrize(
    ("status", "payload", "expected"),
    [
        (
            404,
            vllm_error(404, "The model `x` does not exist.", "NotFoundError"),
            (404, "invalid_request_error", "model_not_found", "model"),
        ),
        (
            400,
            vllm_error(400, "max_tokens is too large", "BadRequestError", "max_tokens"),
            (400, "invalid_request_error", None, "max_tokens"),
        ),
        (
            422,
            b'{"detail": [{"loc": ["body", "messages"], "msg": "Field required"}]}',
            (400, "invalid_request_error", None, None),
        ),
        (400, b'{"detail": "Invalid UTF-8"}', (400, "invalid_request_error", None, None)),
        (
            500,
            vllm_error(500, "/srv/models/x: CUDA out of memory", "InternalServerError"),
            (500, "server_error", "internal_error", None),
        ),
        (502, b"<html>bad gateway</html>", (502, "server_error", "internal_error", None)),
    ],
)
def test_engine_errors_in_openai_words(status: int, payload: bytes, expected: tuple[object, ...]) -> None:
    error = errors.from_engine(status, payload)
    assert (error.status, error.type, error.code, error.param) == expected
    assert isinstance(error.code, str | None)
    if status >= 500:
        assert error.message == "Internal server error."


def test_anthropic_shape_follows_the_status() -> None:
    kinds = {
        s: ANTHROPIC.body(OpenAIError(s, "m"))["error"]["type"] for s in (400, 401, 404, 413, 429, 499, 500, 503, 504)
    }
    assert kinds == {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        499: "invalid_request_error",
        500: "api_error",
        503: "overloaded_error",
        504: "timeout_error",
    }
    assert ANTHROPIC.body(OpenAIError(401, "no key")) == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "no key"},
    }


def test_each_dialect_ends_a_stream_in_its_own_framing() -> None:
    error = errors.request_timeout(25)
    chat = OPENAI.stream_end(error, 7).decode()
    assert chat.endswith("data: [DONE]\n\n") and json.loads(chat.split("\n\n")[0][6:]) == error.body()
    name, data = RESPONSES.stream_end(error, 7).decode().strip().split("\n")
    assert name == "event: error"
    assert json.loads(data[6:]) == {
        "type": "error",
        "code": "request_timeout",
        "message": error.message,
        "param": None,
        "sequence_number": 7,
    }
    name, data = ANTHROPIC.stream_end(error, 7).decode().strip().split("\n")
    assert name == "event: error" and json.loads(data[6:])["error"]["type"] == "timeout_error"


def test_405_names_the_allowed_methods() -> None:
    assert errors.method_not_allowed("PUT", "/v1/models", frozenset({"GET"})).headers == {"Allow": "GET"}
