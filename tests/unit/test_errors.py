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


# --- one table of codes ------------------------------------------------------------------------

EVERY_FACTORY = [
    errors.bad_json("Expecting value at line 1 column 1"),
    errors.nesting_too_deep(64),
    errors.invalid_body(),
    errors.invalid_type("n", "an integer", "3"),
    errors.integer_above_max("n", 16, 17),
    errors.previous_response_unsupported(),
    errors.invalid_client_request_id(512),
    errors.invalid_api_key(),
    errors.key_expired(),
    errors.key_revoked(),
    errors.conflicting_keys(),
    errors.not_found("/nothing"),
    errors.model_not_found("m"),
    errors.response_not_stored(),
    errors.method_not_allowed("PUT", "/v1/models", frozenset({"GET"})),
    errors.body_too_large(10),
    errors.rate_limited("requests", 1, 30, "team"),
    errors.larger_than_limit(10, "tokens_per_minute", 5, "team"),
    errors.insufficient_quota("tokens_per_day", 5, "team", frees_at=100.0, now=40.0),
    errors.larger_than_limit(10, "tokens_per_day", 5, "team"),
    errors.client_closed_request(),
    errors.internal_error(),
    errors.not_ready(),
    errors.server_overloaded(3),
    errors.limits_unavailable(),
    errors.engine_failed(),
    errors.queue_timeout(10, 3),
    errors.request_timeout(60),
    errors.invalid_value("limit must be between 1 and 31 for bucket_width=1d.", "limit"),
    errors.usage_of_other_keys(),
    errors.usage_not_recorded(),
    errors.usage_unavailable(),
    errors.upstream_unavailable(),
    errors.upstream_error(),
]


def test_every_code_in_the_table_has_a_factory() -> None:
    assert {error.code for error in EVERY_FACTORY} == set(errors.CODES)


@pytest.mark.parametrize("error", EVERY_FACTORY, ids=lambda error: f"{error.code}")
def test_each_error_answers_as_its_row_says(error: OpenAIError) -> None:
    assert error.code is not None
    row = errors.CODES[error.code]
    assert error.status == row.status and error.type in row.openai_types
    assert ANTHROPIC.body(error)["error"]["type"] == row.anthropic_type
    assert row.headers.items() <= error.headers.items()
    retry_after = error.headers.get("Retry-After")
    if row.retry_after is None:
        assert retry_after is None
    elif isinstance(row.retry_after, int):
        assert retry_after == str(row.retry_after)
    else:  # worked out by the factory; none for a request that could never fit
        assert retry_after is None or int(retry_after) >= 1


def test_an_anthropic_type_is_the_codes_and_follows_the_status_only_for_the_engines_errors() -> None:
    # 503 alone would say overloaded_error; the code knows better.
    assert ANTHROPIC.body(errors.limits_unavailable())["error"]["type"] == "api_error"
    assert ANTHROPIC.body(errors.internal_error(503))["error"]["type"] == "api_error"
    engine_refusal = errors.from_engine(403, b'{"detail": "not for you"}')
    assert engine_refusal.code is None and ANTHROPIC.body(engine_refusal)["error"]["type"] == "permission_error"


def test_the_refusals_are_the_rows_marked_so() -> None:
    assert {code for code, row in errors.CODES.items() if row.refusal} == errors.REFUSALS
    assert {"invalid_api_key", "insufficient_quota", "limits_unavailable", "request_timeout"} <= errors.REFUSALS
    assert not {"invalid_json", "model_not_found", "internal_error", "engine_failed"} & errors.REFUSALS


def test_the_table_and_the_openapi_descriptions_are_generated_from_the_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert errors.main(["table"]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == errors.table().strip()
    for code, row in errors.CODES.items():
        assert f"| `{code}` | {row.status} |" in printed
        assert f"`{code}`" in errors.when(row.status)
    assert errors.main([]) == 2
