"""The OpenAI surface, through the real server, with the openai SDK and raw HTTP."""

from __future__ import annotations

import json

import openai

from tests.engine.conftest import SERVED_NAME
from tests.support.servers import Server

CAPITAL = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def test_chat_answers_a_simple_question(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=SERVED_NAME, messages=CAPITAL, temperature=0, max_tokens=20)
    assert "paris" in reply.choices[0].message.content.lower()
    assert reply.choices[0].finish_reason in {"stop", "length"}
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0


def test_stream_joins_to_the_full_text_and_ends_with_done(server: Server, client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=SERVED_NAME, messages=CAPITAL, temperature=0, max_tokens=20)
    stream = client.chat.completions.create(
        model=SERVED_NAME, messages=CAPITAL, temperature=0, max_tokens=20, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert all(c.usage is None for c in chunks), "usage sent although the client did not ask"

    with server.http() as http:
        body = {"model": SERVED_NAME, "messages": CAPITAL, "max_tokens": 5, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert len(events) >= 3


def test_stream_usage_chunk_when_asked(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=SERVED_NAME,
            messages=CAPITAL,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=SERVED_NAME, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert reply.choices[0].text.strip()
    assert reply.usage.completion_tokens <= 8


def test_models_lists_the_served_name(server: Server) -> None:
    # The tier's server also serves two adapters: a key limited to the base model sees it alone.
    assert [m.id for m in server.client("base-only").models.list().data] == [SERVED_NAME]


def test_json_schema_output_validates(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "country": {"type": "string", "maxLength": 30},
            "is_capital": {"type": "boolean"},
        },
        "required": ["city", "country", "is_capital"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model=SERVED_NAME,
        messages=[
            {
                "role": "user",
                "content": "Name the capital of France, its country, and whether it is a capital, as JSON.",
            }
        ],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
        max_tokens=200,
        temperature=0,
    )
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    data = json.loads(reply.choices[0].message.content)
    assert set(data) == {"city", "country", "is_capital"}
    assert isinstance(data["city"], str) and len(data["city"]) <= 30
    assert isinstance(data["is_capital"], bool)


def test_n_gives_two_choices(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=SERVED_NAME, messages=CAPITAL, n=2, max_tokens=5, temperature=1.0)
    assert sorted(c.index for c in reply.choices) == [0, 1]


def test_max_tokens_stops_with_length(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=SERVED_NAME,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        max_completion_tokens=5,
        extra_body={"ignore_eos": True},
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5


def test_stop_sequence_and_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=SERVED_NAME,
        messages=[{"role": "user", "content": "Count from 1 to 10 separated by commas."}],
        max_tokens=40,
        temperature=0,
        stop=["5"],
        logprobs=True,
        top_logprobs=2,
    )
    choice = reply.choices[0]
    assert "5" not in choice.message.content
    assert choice.logprobs is not None and choice.logprobs.content
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in choice.logprobs.content)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "strict": True,  # the engine holds the arguments to the schema, so they end in time
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_CALL_REQUIRED = {
    "model": SERVED_NAME,
    "messages": WEATHER,
    "tools": [WEATHER_TOOL],
    "tool_choice": "required",
    "max_tokens": 100,
    "temperature": 0,
}


def test_tools_with_auto_choice_are_answered(client: openai.OpenAI) -> None:
    # A 135M model may or may not call the tool; either answer must be well formed.
    reply = client.chat.completions.create(
        model=SERVED_NAME, messages=WEATHER, tools=[WEATHER_TOOL], tool_choice="auto", max_tokens=60, temperature=0
    )
    choice = reply.choices[0]
    assert choice.finish_reason in {"stop", "length", "tool_calls"}
    for call in choice.message.tool_calls or []:
        assert call.function.name == "get_weather"
        json.loads(call.function.arguments)


def test_required_tool_call_is_parsed_by_the_hermes_parser(client: openai.OpenAI) -> None:
    """tool_choice=required makes the engine emit a Hermes <tool_call> block, which the
    Hermes parser turns into OpenAI tool_calls."""
    choice = client.chat.completions.create(**WEATHER_CALL_REQUIRED).choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city"} and isinstance(arguments["city"], str)
    assert "<tool_call>" not in (choice.message.content or "")


def test_streamed_tool_call_deltas_join_to_the_same_call(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(**WEATHER_CALL_REQUIRED).choices[0].message.tool_calls[0]
    name, arguments, finish = "", "", None
    for chunk in client.chat.completions.create(**WEATHER_CALL_REQUIRED, stream=True):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                assert delta.index == 0
                name += delta.function.name or ""
                arguments += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert name == whole.function.name
    assert json.loads(arguments) == json.loads(whole.function.arguments)


def test_unknown_model_is_404_in_openai_shape(server: Server) -> None:
    with server.http() as http:
        response = http.post("/v1/chat/completions", json={"model": "gpt-17", "messages": CAPITAL})
    assert response.status_code == 404
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "gpt-17" in error["message"]


def test_malformed_json_is_400_in_openai_shape(server: Server) -> None:
    with server.http() as http:
        response = http.post(
            "/v1/chat/completions",
            content=b'{"model": "x", "messages": [',
            headers={"Content-Type": "application/json"},
        )
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_json"


def test_health_and_bentoml_probes(server: Server) -> None:
    with server.http(key=None) as http:
        assert http.get("/health").json() == {"status": "ok", "model": SERVED_NAME}
        assert http.get("/readyz").status_code == 200
        assert http.get("/livez").status_code == 200
