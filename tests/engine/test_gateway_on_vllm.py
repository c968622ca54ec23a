"""What only the real engine can show through the gateway: vLLM's own 400s relayed in OpenAI's
shape, and a client that leaves stopping vLLM's generation (read on vLLM's own counters)."""

from __future__ import annotations

import pytest

from tests.engine.conftest import SERVED_NAME
from tests.support.servers import Server, wait_until
from tests.support.streams import Held

HELLO = [{"role": "user", "content": "Say hello."}]
LONG = {
    "model": SERVED_NAME,
    "messages": [{"role": "user", "content": "Write a very long story."}],
    "max_tokens": 1900,
    "ignore_eos": True,
}
OPENAI_ERROR_FIELDS = {"message", "type", "param", "code"}


def rejections(server: Server, reason: str) -> float:
    return server.metric("hermes_rejections_total", key="tester", reason=reason)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": SERVED_NAME, "messages": [{"role": "wizard", "content": "hi"}]}),
        ("/v1/chat/completions", {"model": SERVED_NAME, "messages": HELLO, "max_tokens": "many"}),
        ("/v1/chat/completions", {"model": SERVED_NAME, "messages": HELLO, "temperature": -3}),
        ("/v1/chat/completions", {"model": SERVED_NAME, "messages": HELLO, "max_tokens": 5000}),
        ("/v1/completions", {"model": SERVED_NAME}),
    ],
)
def test_bad_requests_get_openai_errors(server: Server, path: str, body: object) -> None:
    with server.http() as http:
        response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert set(error) == {"error"} and set(error["error"]) == OPENAI_ERROR_FIELDS, error
    assert "Traceback" not in response.text


def test_a_client_that_cuts_a_stream_frees_the_engine(server: Server) -> None:
    assert wait_until(server.idle, 120)
    left, timed_out = rejections(server, "client_closed_request"), rejections(server, "request_timeout")
    generated = server.metric("vllm:generation_tokens_total")
    with Held(server, LONG) as held:
        for _ in range(5):
            held.event()
        assert server.metric("vllm:num_requests_running") == 1
    # Leaving the block closes the connection mid-stream. Read from counters, which no slow
    # scrape can miss: the gateway ended it as a client that left (not at its time limit),
    # and the engine stopped short of the tokens it was asked for (ignore_eos: it would have
    # generated them all).
    assert wait_until(lambda: rejections(server, "client_closed_request") == left + 1, 120)
    assert rejections(server, "request_timeout") == timed_out
    assert wait_until(server.idle, 120), "engine kept generating"
    assert server.metric("vllm:generation_tokens_total") - generated < LONG["max_tokens"], "engine kept generating"
