from __future__ import annotations

import json
from typing import Any

import pytest

from hermes_serve.apis import CHAT, COMPLETIONS, MESSAGES, RESPONSES, ChatMeter, Meter, Usage
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


def test_responses_estimate_and_stream_usage() -> None:
    body = {"input": "x" * 400, "instructions": "be brief", "max_output_tokens": 20, "store": True}
    assert 100 <= RESPONSES.estimate(body, 2048) - 20 <= 130
    meter = RESPONSES.meter({**body, "stream": True})
    assert meter.feed(b'event: response.output_text.delta\ndata: {"delta":"a"}\n\n')
    done = b'event: response.completed\ndata: {"type":"response.completed","response":{"usage":{"input_tokens":3,"output_tokens":4,"total_tokens":7}}}\n\n'
    assert meter.feed(done) and meter.tokens == 7 and meter.token_events == 1
    incomplete = RESPONSES.meter({"stream": True})
    incomplete.feed(done.replace(b"response.completed", b"response.incomplete"))
    assert incomplete.tokens == 7


def test_messages_usage_is_start_input_plus_delta_output() -> None:
    meter = MESSAGES.meter({"stream": True, "messages": []})
    meter.feed(
        b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":12,"output_tokens":1}}}\n\n'
    )
    assert meter.tokens is None
    meter.feed(b'event: content_block_delta\ndata: {"type":"content_block_delta"}\n\n')
    meter.feed(b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":9}}\n\n')
    assert meter.tokens == 21 and meter.token_events == 2
    whole = MESSAGES.meter({"messages": []})
    whole.read_json(b'{"usage":{"input_tokens":12,"cache_read_input_tokens":30,"output_tokens":9}}')
    assert whole.tokens == 51
    assert (
        MESSAGES.estimate({"system": "s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9}, 2048) < 30
    )


@pytest.mark.parametrize(
    ("body", "sequences"),
    [({}, 1), ({"n": None}, 1), ({"n": 1}, 1), ({"n": 16}, 16), ({"n": 2, "best_of": 5}, 5), ({"n": 0}, 1)],
)
def test_sequences_are_n_or_best_of_at_least_one(body: dict[str, object], sequences: int) -> None:
    assert CHAT.sequences(body, max_n=16) == sequences
    assert COMPLETIONS.sequences(body, max_n=16) == sequences


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"n": 17}, "integer_above_max_value", "n"),
        ({"n": 1, "best_of": 256}, "integer_above_max_value", "best_of"),
        # vLLM's lax parsing would read each of these as 256, past the cap.
        ({"n": "256"}, "invalid_type", "n"),
        ({"n": 256.0}, "invalid_type", "n"),
        ({"best_of": True}, "invalid_type", "best_of"),
    ],
)
def test_more_sequences_than_max_n_or_anything_but_an_integer_is_400(
    body: dict[str, object], code: str, param: str
) -> None:
    for api in (CHAT, COMPLETIONS):
        with pytest.raises(OpenAIError) as refused:
            api.sequences(body, max_n=16)
        assert (refused.value.status, refused.value.code, refused.value.param) == (400, code, param)
    assert "16" in refused.value.message or "integer" in refused.value.message


def test_apis_without_n_are_one_sequence_whatever_they_carry() -> None:
    assert RESPONSES.sequences({"n": 500}, max_n=16) == 1
    assert MESSAGES.sequences({"n": "x"}, max_n=16) == 1


@pytest.mark.parametrize(
    ("api", "answer", "expected"),
    [
        (
            CHAT,
            {"usage": {"prompt_tokens": 12, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 8}}},
            Usage(12, 8, 5),
        ),
        (COMPLETIONS, {"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}, Usage(3, 0, 4)),
        (
            RESPONSES,
            {"usage": {"input_tokens": 9, "output_tokens": 2, "input_tokens_details": {"cached_tokens": 6}}},
            Usage(9, 6, 2),
        ),
        # Anthropic counts cache reads apart from input_tokens: all of them are the prompt.
        (MESSAGES, {"usage": {"input_tokens": 4, "cache_read_input_tokens": 16, "output_tokens": 3}}, Usage(20, 16, 3)),
        (CHAT, {"usage": {"total_tokens": 7}}, Usage(input=7)),  # a total alone is still charged
        (CHAT, {"usage": None}, None),
    ],
)
def test_each_apis_usage_is_read_as_input_cached_and_output(api: Any, answer: dict[str, Any], expected: Any) -> None:
    body: dict[str, Any] = {}
    meter = api.meter(body)
    meter.read_json(json.dumps(answer).encode())
    assert meter.usage == expected
    assert meter.tokens == (None if expected is None else expected.total)


def test_an_anthropic_stream_reports_cached_input_at_its_start() -> None:
    meter = MESSAGES.meter({"stream": True})
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 2, "cache_read_input_tokens": 30}}}
    meter.feed(b"event: message_start\ndata: " + json.dumps(start).encode())
    meter.feed(b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":4}}')
    assert meter.usage == Usage(32, 30, 4)


@pytest.mark.parametrize(
    ("api", "body", "end_user"),
    [
        (CHAT, {"user": "u-1"}, "u-1"),
        (CHAT, {"user": "u-1", "safety_identifier": "s-1"}, "s-1"),  # OpenAI's newer field first
        (RESPONSES, {"safety_identifier": "s-2"}, "s-2"),
        (COMPLETIONS, {"user": ""}, None),
        (CHAT, {"user": 42}, None),
        (MESSAGES, {"metadata": {"user_id": "a-1"}}, "a-1"),
        (MESSAGES, {"user": "not anthropic's"}, None),
    ],
)
def test_the_end_user_is_read_where_each_api_names_it(api: Any, body: dict[str, Any], end_user: str | None) -> None:
    assert api.end_user(body) == end_user
