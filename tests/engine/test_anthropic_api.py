"""Anthropic's Messages API through the real server, with the anthropic SDK."""

from __future__ import annotations

import anthropic
import pytest

from tests.engine.conftest import SERVED_NAME
from tests.support.servers import Server

CAPITAL = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
GREEDY = {"temperature": 0}  # vLLM reads it; this SDK version no longer takes it as an argument


@pytest.fixture
def claude(server: Server) -> anthropic.Anthropic:
    """The Anthropic SDK pointed at us: it sends the key as x-api-key."""
    return anthropic.Anthropic(base_url=server.url, api_key=server.keys["tester"], max_retries=0)


def test_plain_message_answers_with_usage(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model=SERVED_NAME, messages=CAPITAL, max_tokens=20, extra_body=GREEDY)
    assert message.type == "message" and message.role == "assistant"
    assert "paris" in message.content[0].text.lower()  # type: ignore[union-attr]
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0


def test_streamed_message_joins_to_the_same_text(claude: anthropic.Anthropic) -> None:
    whole = claude.messages.create(model=SERVED_NAME, messages=CAPITAL, max_tokens=20, extra_body=GREEDY)
    with claude.messages.stream(model=SERVED_NAME, messages=CAPITAL, max_tokens=20, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text  # type: ignore[union-attr]
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_count_tokens(claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(model=SERVED_NAME, messages=CAPITAL)
    message = claude.messages.create(model=SERVED_NAME, messages=CAPITAL, max_tokens=1)
    assert counted.input_tokens == message.usage.input_tokens


def test_errors_are_the_anthropic_sdks_own(server: Server, claude: anthropic.Anthropic) -> None:
    wrong = anthropic.Anthropic(base_url=server.url, api_key="hs-not-a-key", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as unauthenticated:
        wrong.messages.create(model=SERVED_NAME, messages=CAPITAL, max_tokens=5)
    assert unauthenticated.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert "hs-not-a-key" not in unauthenticated.value.response.text
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="claude-17", messages=CAPITAL, max_tokens=5)
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model=SERVED_NAME, messages=[{"role": "wizard", "content": "hi"}], max_tokens=5)  # type: ignore[typeddict-item]
    assert bad.value.body["type"] == "error"  # type: ignore[index]
