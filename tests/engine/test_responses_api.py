"""OpenAI's Responses API through the real server, with the openai SDK."""

from __future__ import annotations

import json

import openai
import pytest

from tests.engine.conftest import SERVED_NAME
from tests.support.servers import Server

CAPITAL = "What is the capital of France? Answer in one word."
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city",
    "strict": True,
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


def test_plain_response_answers_with_usage(client: openai.OpenAI) -> None:
    response = client.responses.create(model=SERVED_NAME, input=CAPITAL, max_output_tokens=20, temperature=0)
    assert response.status in {"completed", "incomplete"}
    assert "paris" in response.output_text.lower()
    assert response.usage is not None and response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens


def test_streamed_response_joins_to_the_same_text_and_ends_with_completed(client: openai.OpenAI) -> None:
    whole = client.responses.create(model=SERVED_NAME, input=CAPITAL, max_output_tokens=20, temperature=0)
    events = list(
        client.responses.create(model=SERVED_NAME, input=CAPITAL, max_output_tokens=20, temperature=0, stream=True)
    )
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text
    assert events[-1].type in {"response.completed", "response.incomplete"}
    assert events[-1].response.usage is not None and events[-1].response.usage.output_tokens > 0


def test_required_function_tool_is_called(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=SERVED_NAME,
        input="What is the weather in Paris?",
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_output_tokens=100,
        temperature=0,
    )
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1, response.output
    assert calls[0].name == "get_weather" and calls[0].call_id
    arguments = json.loads(calls[0].arguments)
    assert set(arguments) == {"city"} and isinstance(arguments["city"], str)


def test_nothing_is_stored_so_nothing_can_be_chained_or_retrieved(client: openai.OpenAI) -> None:
    stored = client.responses.create(model=SERVED_NAME, input=CAPITAL, max_output_tokens=5, store=True)
    with pytest.raises(openai.NotFoundError) as retrieve:
        client.responses.retrieve(stored.id)
    assert retrieve.value.code == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(stored.id)
    with pytest.raises(openai.BadRequestError) as chained:
        client.responses.create(
            model=SERVED_NAME, input="And Spain?", previous_response_id=stored.id, max_output_tokens=5
        )
    assert chained.value.code == "unsupported_parameter" and chained.value.param == "previous_response_id"


def test_unknown_model_is_404_in_openai_words(server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        server.client().responses.create(model="gpt-17", input=CAPITAL)
    assert missing.value.code == "model_not_found"
    assert missing.value.body["type"] == "invalid_request_error"  # type: ignore[index]
