"""Keys, limits, bad input and metrics on the real server (two replicas over one Redis)."""

from __future__ import annotations

import secrets

import anthropic
import httpx
import openai
import pytest

from tests.gateway.conftest import SCRIPTED
from tests.support.load import series_count
from tests.support.servers import Server, wait_until

HELLO = [{"role": "user", "content": "Say hello."}]
OPENAI_ERROR_FIELDS = {"message", "type", "param", "code"}


def _error(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == OPENAI_ERROR_FIELDS, body
    return dict(body["error"])


def test_missing_or_wrong_key_is_401(server: Server) -> None:
    with server.http(key=None) as http:
        missing = http.post("/v1/chat/completions", json={"model": SCRIPTED, "messages": HELLO})
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
        raw = client.chat.completions.with_raw_response.create(model=SCRIPTED, messages=HELLO, max_tokens=2)
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=SCRIPTED, messages=HELLO, max_tokens=2)
    assert refused.value.code == "rate_limit_exceeded"
    # A rolling minute counted as two (the last one weighted): it frees within two minutes.
    assert 1 <= int(refused.value.response.headers["retry-after"]) <= 120


def test_request_larger_than_the_token_budget_is_429(server: Server) -> None:
    with pytest.raises(openai.RateLimitError) as refused:
        server.client("thrifty").chat.completions.create(model=SCRIPTED, messages=HELLO, max_tokens=400)
    assert refused.value.code == "rate_limit_exceeded"


def test_two_processes_over_one_redis_share_a_key_budget(front: tuple[Server, Server]) -> None:
    first, second = front
    for server in (first, second, first):
        server.client("shared").chat.completions.create(model=SCRIPTED, messages=HELLO, max_tokens=2)
    with pytest.raises(openai.RateLimitError):
        second.client("shared").chat.completions.create(model=SCRIPTED, messages=HELLO, max_tokens=2)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("GET", "/v1/nope", None, 404, "not_found"),
        ("GET", "/v1/chat/completions", None, 405, "method_not_allowed"),
        (
            "POST",
            "/v1/chat/completions",
            {"model": SCRIPTED, "messages": [{"role": "wizard", "content": "hi"}]},
            400,
            None,
        ),
        ("POST", "/v1/chat/completions", {"model": SCRIPTED, "messages": HELLO, "max_tokens": "many"}, 400, None),
        ("POST", "/v1/chat/completions", {"model": SCRIPTED, "messages": HELLO, "temperature": -3}, 400, None),
        ("POST", "/v1/completions", {"model": SCRIPTED}, 400, None),
        (
            "POST",
            "/v1/chat/completions",
            {"model": SCRIPTED, "messages": [{"role": "user", "content": "x" * 70000}]},
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


def test_every_api_is_relayed_with_its_usage_and_charged_exactly(server: Server) -> None:
    """The scripted engine answers in vLLM's framing; the gateway charges what it reports."""

    def charged() -> float:
        return server.metric("hermes_tokens_total", key="meter")

    client = server.client("meter")
    ask = [{"role": "user", "content": "Count. [[tokens=5]]"}]
    reported = [
        client.chat.completions.create(model=SCRIPTED, messages=ask).usage.total_tokens,  # type: ignore[union-attr]
        list(
            client.chat.completions.create(
                model=SCRIPTED, messages=ask, stream=True, stream_options={"include_usage": True}
            )
        )[-1].usage.total_tokens,
        client.completions.create(model=SCRIPTED, prompt="Count. [[tokens=5]]").usage.total_tokens,  # type: ignore[union-attr]
        client.responses.create(model=SCRIPTED, input="Count. [[tokens=5]]").usage.total_tokens,  # type: ignore[union-attr]
        list(client.responses.create(model=SCRIPTED, input="Count. [[tokens=5]]", stream=True))[
            -1
        ].response.usage.total_tokens,
    ]
    claude = anthropic.Anthropic(base_url=server.url, api_key=server.keys["meter"], max_retries=0)
    # Anthropic's input_tokens leave out what the prefix cache read (the engine's cache has
    # this prompt from the first call): the prompt is all of them.
    usage = claude.messages.create(model=SCRIPTED, max_tokens=5, messages=ask).usage
    reported.append(usage.input_tokens + (usage.cache_read_input_tokens or 0) + usage.output_tokens)
    with claude.messages.stream(model=SCRIPTED, max_tokens=5, messages=ask) as events:
        usage = events.get_final_message().usage
    reported.append(usage.input_tokens + (usage.cache_read_input_tokens or 0) + usage.output_tokens)
    assert all(n > 5 for n in reported), reported
    # The key is this test's alone; a request's charge is counted as its record closes.
    assert wait_until(lambda: charged() == sum(reported)), (charged(), reported)
