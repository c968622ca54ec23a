from __future__ import annotations

import json

import pytest

from hermes_serve.errors import OpenAIError
from hermes_serve.usage import (
    estimate_tokens,
    request_usage_in_stream,
    usage_from_json,
    usage_from_sse_chunk,
    validate_request,
)

CHAT = "/v1/chat/completions"


def test_estimate_counts_prompt_and_completion_times_n() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50, "n": 2}
    estimate = estimate_tokens(body, max_model_len=2048)
    prompt = estimate - 100
    assert 100 <= prompt <= 130  # 400+ bytes at 4 bytes a token, never under the text


def test_estimate_without_max_tokens_reserves_the_rest_of_the_context() -> None:
    assert estimate_tokens({"prompt": "hi"}, max_model_len=1000) == 1000
    assert estimate_tokens({"prompt": "hi", "max_completion_tokens": 7}, max_model_len=1000) == 2 + 7


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "a"}, "b"]}, "messages[1].role"),
    ],
)
def test_invalid_chat_requests_are_400(body: object, param: str | None) -> None:
    with pytest.raises(OpenAIError) as raised:
        validate_request(CHAT, body)
    assert raised.value.status == 400 and raised.value.param == param


def test_valid_requests_pass() -> None:
    validate_request(CHAT, {"messages": [{"role": r, "content": "x"} for r in ("system", "user", "assistant", "tool")]})
    validate_request("/v1/completions", {"prompt": "x"})


def test_stream_usage_is_requested_and_remembers_whether_the_client_asked() -> None:
    body: dict[str, object] = {"stream": True}
    assert request_usage_in_stream(body) is False
    assert body["stream_options"] == {"include_usage": True}
    asked = {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": False}}
    assert request_usage_in_stream(asked) is True
    assert asked["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}


def test_usage_from_responses() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert usage_from_json(json.dumps({"choices": [], "usage": usage}).encode()) == 7
    assert usage_from_json(b"not json") is None
    final = b"data: " + json.dumps({"choices": [], "usage": usage}, separators=(",", ":")).encode() + b"\n\n"
    assert usage_from_sse_chunk(final) == 7
    delta = b'data: {"choices":[{"delta":{"content":"usage"}}],"usage":null}\n\n'
    assert usage_from_sse_chunk(delta) is None
    assert usage_from_sse_chunk(b"data: [DONE]\n\n") is None
