from __future__ import annotations

import json

import pytest

from hermes_serve.apis import CHAT, COMPLETIONS, ChatMeter, Meter
from hermes_serve.errors import OpenAIError


def test_estimate_counts_prompt_and_completion_times_n() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50, "n": 2}
    estimate = CHAT.estimate(body, max_model_len=2048)
    prompt = estimate - 100
    assert 100 <= prompt <= 130  # 400+ bytes at 4 bytes a token, never under the text


def test_estimate_without_max_tokens_reserves_the_rest_of_the_context() -> None:
    assert COMPLETIONS.estimate({"prompt": "hi"}, max_model_len=1000) == 1000
    assert COMPLETIONS.estimate({"prompt": "hi", "max_completion_tokens": 7}, max_model_len=1000) == 2 + 7


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
        CHAT.validate(body)
    assert raised.value.status == 400 and raised.value.param == param


def test_valid_requests_pass() -> None:
    CHAT.validate({"messages": [{"role": r, "content": "x"} for r in ("system", "user", "assistant", "tool")]})
    COMPLETIONS.validate({"prompt": "x"})


def test_stream_usage_is_requested_and_remembers_whether_the_client_asked() -> None:
    body: dict[str, object] = {"stream": True}
    meter = CHAT.meter(body)
    assert body["stream_options"] == {"include_usage": True}
    asked = {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": False}}
    asked_meter = CHAT.meter(asked)
    assert asked["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}
    usage_event = b'data: {"choices":[],"usage":{"total_tokens":3}}\n\n'
    assert meter.feed(usage_event) is False, "hidden: the client did not ask"
    assert asked_meter.feed(usage_event) is True
    assert meter.tokens == asked_meter.tokens == 3


def test_usage_from_responses() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    meter = Meter()
    meter.read_json(json.dumps({"choices": [], "usage": usage}).encode())
    assert meter.tokens == 7
    meter = Meter()
    meter.read_json(b"not json")
    assert meter.tokens is None
    final = b"data: " + json.dumps({"choices": [], "usage": usage}, separators=(",", ":")).encode() + b"\n\n"
    stream = ChatMeter(hide_usage_event=False)
    stream.feed(final)
    assert stream.tokens == 7
    for chunk in (b'data: {"choices":[{"delta":{"content":"usage"}}],"usage":null}\n\n', b"data: [DONE]\n\n"):
        stream = ChatMeter(hide_usage_event=False)
        assert stream.feed(chunk) is True and stream.tokens is None


def test_a_non_stream_request_is_not_changed() -> None:
    body = {"messages": [{"role": "user", "content": "x"}]}
    assert type(CHAT.meter(body)) is Meter and "stream_options" not in body
