"""Every generation API, streamed and not, charges the key exactly what the engine reported,
and a stream cut short is charged too (the key "meter" is used by these tests alone)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import pytest

from tests.engine.conftest import SERVED_NAME
from tests.support.servers import Server, wait_until

PROMPT = "Name three colours."
# Greedy decoding (temperature 0) answers it past 1 000 tokens: the Anthropic API has no
# ignore_eos, and a sampled answer to a weaker prompt once ended before its client left.
LONG_PROMPT = "List the numbers from 1 to 1000, separated by commas."


def charged(server: Server) -> float:
    return server.metric("hermes_tokens_total", key="meter")


def cut(server: Server) -> float:
    return server.metric("hermes_rejections_total", key="meter", reason="client_closed_request")


def wait_for_charge(server: Server, before: float, expected: Callable[[float], bool]) -> float:
    """The charge lands when the gateway settles, just after the client has its answer."""
    wait_until(lambda: expected(charged(server) - before))
    return charged(server) - before


def chat(server: Server, stream: bool) -> int:
    client = server.client("meter")
    if not stream:
        return client.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=12
        ).usage.total_tokens  # type: ignore[union-attr]
    chunks = list(
        client.chat.completions.create(
            model=SERVED_NAME,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    return chunks[-1].usage.total_tokens  # type: ignore[union-attr]


def completions(server: Server, stream: bool) -> int:
    client = server.client("meter")
    if not stream:
        return client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=12).usage.total_tokens  # type: ignore[union-attr]
    chunks = list(
        client.completions.create(
            model=SERVED_NAME, prompt=PROMPT, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    return chunks[-1].usage.total_tokens  # type: ignore[union-attr]


def responses(server: Server, stream: bool) -> int:
    client = server.client("meter")
    if not stream:
        return client.responses.create(model=SERVED_NAME, input=PROMPT, max_output_tokens=12).usage.total_tokens  # type: ignore[union-attr]
    events = list(client.responses.create(model=SERVED_NAME, input=PROMPT, max_output_tokens=12, stream=True))
    return events[-1].response.usage.total_tokens  # type: ignore[union-attr]


def messages(server: Server, stream: bool) -> int:
    client = anthropic.Anthropic(base_url=server.url, api_key=server.keys["meter"], max_retries=0)
    ask: dict[str, Any] = {"model": SERVED_NAME, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 12}
    if not stream:
        usage = client.messages.create(**ask).usage
        return usage.input_tokens + usage.output_tokens
    with client.messages.stream(**ask) as events:
        usage = events.get_final_message().usage
    return usage.input_tokens + usage.output_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("api", [chat, completions, responses, messages])
def test_tokens_charged_equal_the_usage_the_engine_reported(
    server: Server, api: Callable[[Server, bool], int], stream: bool
) -> None:
    before = charged(server)
    reported = api(server, stream)
    assert reported > 0
    assert wait_for_charge(server, before, lambda delta: delta == reported) == reported


CUT_SHORT = {
    "/v1/chat/completions": {
        "messages": [{"role": "user", "content": LONG_PROMPT}],
        "max_tokens": 1000,
        "ignore_eos": True,
    },
    "/v1/completions": {"prompt": LONG_PROMPT, "max_tokens": 1000, "ignore_eos": True},
    "/v1/responses": {"input": LONG_PROMPT, "max_output_tokens": 1000, "ignore_eos": True},
    "/v1/messages": {"messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 1000, "temperature": 0},
}


@pytest.mark.parametrize("path", list(CUT_SHORT))
def test_a_stream_cut_short_is_charged(server: Server, path: str) -> None:
    before = charged(server)
    cut_before = cut(server)
    body = {"model": SERVED_NAME, "stream": True, **CUT_SHORT[path]}
    seen = 0
    with server.http("meter") as http, http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            seen += line.startswith("data: ")
            if seen == 8:
                break
    # The gateway saw the client leave while the engine still had hundreds of tokens to go.
    delta = wait_for_charge(server, before, lambda delta: delta > 0)
    assert seen <= delta < 1000 + len(LONG_PROMPT), delta
    # Counted as the request's record is closed, just after its tokens are settled.
    assert wait_until(lambda: cut(server) - cut_before == 1), cut(server) - cut_before


def test_a_stream_whose_client_did_not_ask_for_usage_is_charged_all_the_same(server: Server) -> None:
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 12, "temperature": 0}
    client = server.client("meter")
    expected = client.chat.completions.create(**body).usage.total_tokens  # type: ignore[call-overload]
    before = charged(server)
    chunks = list(client.chat.completions.create(**body, stream=True))  # type: ignore[call-overload]
    assert all(chunk.usage is None for chunk in chunks)
    assert wait_for_charge(server, before, lambda delta: delta == expected) == expected
