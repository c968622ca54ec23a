"""The gateway on the real server: keys, limits, admission, timeouts, disconnects, errors."""

from __future__ import annotations

import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.e2e.conftest import QUEUE_TIMEOUT_S, REQUEST_TIMEOUT_S, SERVED_NAME
from tests.support.load import series_count
from tests.support.servers import Server, wait_until

HELLO = [{"role": "user", "content": "Say hello."}]
LONG = {
    "model": SERVED_NAME,
    "messages": [{"role": "user", "content": "Write a very long story."}],
    "max_tokens": 1900,
    "ignore_eos": True,
}
OPENAI_ERROR_FIELDS = {"message", "type", "param", "code"}


def _error(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == OPENAI_ERROR_FIELDS, body
    return body["error"]


def test_missing_or_wrong_key_is_401(server: Server) -> None:
    with server.http(key=None) as http:
        missing = http.post("/v1/chat/completions", json={"model": SERVED_NAME, "messages": HELLO})
    assert missing.status_code == 401 and _error(missing)["code"] == "invalid_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="hs-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as bad:
        wrong.models.list()
    assert bad.value.code == "invalid_api_key"
    assert bad.value.response.headers["www-authenticate"] == "Bearer"
    assert "hs-not-a-key" not in bad.value.response.text


def test_fourth_request_at_three_per_minute_is_429(server: Server) -> None:
    client = server.client("limited")
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(model=SERVED_NAME, messages=HELLO, max_tokens=2)
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=SERVED_NAME, messages=HELLO, max_tokens=2)
    assert refused.value.code == "rate_limit_exceeded"
    # A rolling minute counted as two (the last one weighted): it frees within two minutes.
    assert 1 <= int(refused.value.response.headers["retry-after"]) <= 120


def test_request_larger_than_the_token_budget_is_429(server: Server) -> None:
    with pytest.raises(openai.RateLimitError) as refused:
        server.client("thrifty").chat.completions.create(model=SERVED_NAME, messages=HELLO, max_tokens=400)
    assert refused.value.code == "rate_limit_exceeded"


def test_two_processes_over_one_redis_share_a_key_budget(servers_pair: tuple[Server, Server]) -> None:
    first, second = servers_pair
    for server in (first, second, first):
        server.client("shared").chat.completions.create(model=SERVED_NAME, messages=HELLO, max_tokens=2)
    with pytest.raises(openai.RateLimitError):
        second.client("shared").chat.completions.create(model=SERVED_NAME, messages=HELLO, max_tokens=2)


def test_queue_full_is_503_queue_wait_is_504_and_request_timeout_is_504(server: Server) -> None:
    """Concurrency 1, queue 1: the running request times out, the queued one waits too long,
    and a third is refused at once."""
    results: dict[str, httpx.Response] = {}

    def post(name: str) -> None:
        with server.http() as http:
            results[name] = http.post("/v1/chat/completions", json=LONG)

    with ThreadPoolExecutor(3) as pool:
        pool.submit(post, "running")
        assert wait_until(lambda: server.metric("hermes_running_requests") == 1)
        pool.submit(post, "queued")
        # Seen before its queue_timeout_s ends, however slow the machine.
        assert wait_until(lambda: server.metric("hermes_waiting_requests") == 1, QUEUE_TIMEOUT_S)
        post("refused")
    refused, queued, running = results["refused"], results["queued"], results["running"]

    assert refused.status_code == 503, refused.text
    assert _error(refused)["code"] == "server_overloaded"
    assert int(refused.headers["retry-after"]) >= 1
    assert queued.status_code == 504 and _error(queued)["code"] == "queue_timeout", queued.text
    assert running.status_code == 504 and _error(running)["code"] == "request_timeout", running.text
    assert wait_until(server.idle), "engine request was not aborted"


def test_stream_past_request_timeout_ends_with_an_error_frame(server: Server) -> None:
    started = time.monotonic()
    with server.http() as http, http.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert REQUEST_TIMEOUT_S - 1 <= time.monotonic() - started < REQUEST_TIMEOUT_S + 15
    assert '"request_timeout"' in events[-2] and events[-1] == "data: [DONE]"
    assert wait_until(server.idle)


def test_client_that_cuts_a_stream_frees_the_engine(server: Server) -> None:
    with server.http() as http, http.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as response:
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
        assert server.metric("vllm:num_requests_running") == 1
    # Leaving the block closes the connection mid-stream. The wait stays well short of the
    # request's own timeout (REQUEST_TIMEOUT_S), which would end it anyway.
    assert wait_until(server.idle, timeout=REQUEST_TIMEOUT_S / 2), "engine kept generating"


def test_client_that_gives_up_while_queued_frees_its_place(server: Server) -> None:
    done = threading.Event()

    def hold_the_slot() -> None:
        with (
            server.http() as http,
            http.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as response,
        ):
            for _ in response.iter_lines():
                if done.is_set():
                    return

    holder = threading.Thread(target=hold_the_slot)
    holder.start()
    try:
        assert wait_until(lambda: server.metric("hermes_running_requests") == 1)
        with pytest.raises(httpx.ReadTimeout), server.http() as http:
            http.post("/v1/chat/completions", json=LONG, timeout=1.0)
        assert wait_until(lambda: server.metric("hermes_waiting_requests") == 0, timeout=QUEUE_TIMEOUT_S - 1)
    finally:
        done.set()
        holder.join()
    assert wait_until(server.idle)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("GET", "/v1/nope", None, 404, "not_found"),
        ("GET", "/v1/chat/completions", None, 405, "method_not_allowed"),
        (
            "POST",
            "/v1/chat/completions",
            {"model": SERVED_NAME, "messages": [{"role": "wizard", "content": "hi"}]},
            400,
            None,
        ),
        ("POST", "/v1/chat/completions", {"model": SERVED_NAME, "messages": HELLO, "max_tokens": "many"}, 400, None),
        ("POST", "/v1/chat/completions", {"model": SERVED_NAME, "messages": HELLO, "temperature": -3}, 400, None),
        ("POST", "/v1/completions", {"model": SERVED_NAME}, 400, None),
        (
            "POST",
            "/v1/chat/completions",
            {"model": SERVED_NAME, "messages": [{"role": "user", "content": "x" * 70000}]},
            413,
            "request_too_large",
        ),
    ],
)
def test_bad_requests_get_openai_errors(
    server: Server, method: str, path: str, body: object, status: int, code: str | None
) -> None:
    with server.http() as http:
        response = http.request(method, path, json=body)
    assert response.status_code == status, response.text
    error = _error(response)
    if code:
        assert error["code"] == code
    assert "Traceback" not in response.text


def test_invalid_utf8_is_400(server: Server) -> None:
    with server.http() as http:
        response = http.post(
            "/v1/chat/completions", content=b'{"model": "\xff\xfe"}', headers={"Content-Type": "application/json"}
        )
    assert response.status_code == 400
    assert _error(response)["code"] == "invalid_json"


def test_gateway_metrics_by_key_name(server: Server) -> None:
    server.client().models.list()
    text = server.metrics_text()
    assert 'hermes_requests_total{key="tester",route="/v1/models",status="200"}' in text
    assert all(key not in text for key in server.keys.values())


def test_paths_clients_make_up_add_no_series_and_never_show_in_metrics(server: Server) -> None:
    """BentoML's own traffic metrics count routes (hermes_serve/bentoml_patches.py)."""
    made_up = "made-up-" + secrets.token_hex(6)
    with server.http() as http:
        for path in (f"/{made_up}", f"/v1/responses/{made_up}", f"/console/{made_up}.js", f"/v1/{made_up}/x"):
            assert http.get(path).status_code == 404
    text = server.metrics_text()
    assert made_up not in text
    assert 'endpoint="other"' in text and 'endpoint="/v1/responses/{id:path}"' in text
    series = series_count(server)
    for i in range(20):
        httpx.get(f"{server.url}/{made_up}-{i}")
    # Each new path used to add three series, one a histogram: about 40 samples.
    assert series_count(server) - series < 10, "twenty more made-up paths, no more series"
