"""A full gateway and its time limits, on servers of their own: one fate per test, each
request sent once the gateway shows the state it is meant to meet (read from its gauges), and
held in the scripted engine by a gate, not by a duration."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest

from tests.gateway.conftest import HI, HOLD, SCRIPTED
from tests.support.servers import Server, wait_until
from tests.support.streams import Held

OPENAI_ERROR_FIELDS = {"message", "type", "param", "code"}


def rejections(server: Server, reason: str) -> float:
    return server.metric("hermes_rejections_total", key="tester", reason=reason)


def holds(server: Server) -> tuple[float, float]:
    """(running, waiting) as the gateway reports them, from one scrape."""
    scrape = server.scrape()
    return scrape.value("hermes_running_requests"), scrape.value("hermes_waiting_requests")


def error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == OPENAI_ERROR_FIELDS, body
    return dict(body["error"])


def post(server: Server, body: dict[str, Any]) -> httpx.Response:
    with server.http() as http:
        return http.post("/v1/chat/completions", json=body)


def test_a_request_past_its_time_limit_is_504_and_its_engine_request_is_aborted(request_limit: Server) -> None:
    before = rejections(request_limit, "request_timeout")
    reply = post(request_limit, HOLD)
    assert reply.status_code == 504 and error(reply)["code"] == "request_timeout"
    assert int(reply.headers["retry-after"]) >= 1
    assert wait_until(lambda: rejections(request_limit, "request_timeout") == before + 1)
    assert wait_until(request_limit.idle), "engine request was not aborted"


HELD_STREAMS = {
    "/v1/chat/completions": HOLD,
    "/v1/completions": {"model": SCRIPTED, "prompt": "Take your time. [[hold]]", "max_tokens": 1000},
    "/v1/responses": {"model": SCRIPTED, "input": "Take your time. [[hold]]", "max_output_tokens": 1000},
    "/v1/messages": HOLD,
}


@pytest.mark.parametrize("path", list(HELD_STREAMS))
def test_a_stream_past_its_time_limit_ends_with_its_apis_own_error_event(request_limit: Server, path: str) -> None:
    with Held(request_limit, HELD_STREAMS[path], path=path) as held:
        assert held.status == 200
        lines = held.rest()
    if path in ("/v1/chat/completions", "/v1/completions"):
        assert '"request_timeout"' in lines[-2] and lines[-1] == "data: [DONE]", lines[-2:]
    elif path == "/v1/responses":
        assert lines[-2] == "event: error" and '"code":"request_timeout"' in lines[-1], lines[-2:]
    else:
        assert lines[-2] == "event: error" and '"type":"timeout_error"' in lines[-1], lines[-2:]
    assert wait_until(request_limit.idle)


def test_a_queued_request_past_its_queue_limit_is_504(queue_wait: Server) -> None:
    before = rejections(queue_wait, "queue_timeout")
    with Held(queue_wait, HOLD):  # takes the one slot until it leaves
        assert wait_until(lambda: holds(queue_wait) == (1, 0))
        reply = post(queue_wait, HI)
    assert reply.status_code == 504 and error(reply)["code"] == "queue_timeout"
    assert int(reply.headers["retry-after"]) >= 1
    assert wait_until(lambda: rejections(queue_wait, "queue_timeout") == before + 1)
    assert wait_until(queue_wait.idle)


def test_a_request_past_a_full_queue_is_503_at_once(queue_full: Server) -> None:
    before = rejections(queue_full, "server_overloaded")
    queued: dict[str, httpx.Response] = {}
    with Held(queue_full, HOLD):
        assert wait_until(lambda: holds(queue_full) == (1, 0))
        waiting = threading.Thread(target=lambda: queued.setdefault("reply", post(queue_full, HI)))
        waiting.start()
        assert wait_until(lambda: holds(queue_full) == (1, 1))
        refused = post(queue_full, HI)
        assert refused.status_code == 503 and error(refused)["code"] == "server_overloaded"
        assert int(refused.headers["retry-after"]) >= 1
    waiting.join(timeout=60)
    assert queued["reply"].status_code == 200, "the queued request runs once the slot frees"
    assert wait_until(lambda: rejections(queue_full, "server_overloaded") == before + 1)
    assert wait_until(queue_full.idle)


def test_a_client_that_gives_up_while_queued_frees_its_place(queue_full: Server) -> None:
    with Held(queue_full, HOLD):
        assert wait_until(lambda: holds(queue_full) == (1, 0))
        left, timed_out = rejections(queue_full, "client_closed_request"), rejections(queue_full, "queue_timeout")
        with Held(queue_full, HI, wait_for_answer=False):
            assert wait_until(lambda: holds(queue_full) == (1, 1))
        # Its place is freed when it leaves, not when its queue limit ends: it is counted as a
        # client that left, never as a queue timeout.
        assert wait_until(lambda: rejections(queue_full, "client_closed_request") == left + 1)
        assert rejections(queue_full, "queue_timeout") == timed_out
        assert queue_full.metric("hermes_waiting_requests") == 0
    assert wait_until(queue_full.idle)


def test_a_client_that_cuts_a_stream_frees_the_engine(server: Server) -> None:
    left, timed_out = rejections(server, "client_closed_request"), rejections(server, "request_timeout")
    generated = server.metric("vllm:generation_tokens_total")
    with Held(server, HOLD) as held:
        held.event()
        assert wait_until(lambda: server.metric("vllm:num_requests_running") == 1)
    # Read from counters, which no slow scrape can miss: ended as a client that left, and the
    # engine stopped short of the tokens it was asked for.
    assert wait_until(lambda: rejections(server, "client_closed_request") == left + 1)
    assert rejections(server, "request_timeout") == timed_out
    assert wait_until(server.idle), "engine kept generating"
    assert server.metric("vllm:generation_tokens_total") - generated < HOLD["max_tokens"], "engine kept generating"
