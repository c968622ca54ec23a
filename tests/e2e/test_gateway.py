"""The gateway on the real server: keys, limits, admission, timeouts, disconnects, errors."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai
import pytest

from tests.e2e.conftest import QUEUE_TIMEOUT_S, REQUEST_TIMEOUT_S, SERVED_NAME
from tests.support.load import series_count
from tests.support.servers import Server, wait_until
from tests.support.stalls import WATCH

HELLO = [{"role": "user", "content": "Say hello."}]
LONG = {
    "model": SERVED_NAME,
    "messages": [{"role": "user", "content": "Write a very long story."}],
    "max_tokens": 1900,
    "ignore_eos": True,
}
OPENAI_ERROR_FIELDS = {"message", "type", "param", "code"}


# The fates of three requests under a full gateway, by their error codes (also the reasons
# they are counted under): refused at once, waited too long, ran too long.
FATES = ("server_overloaded", "queue_timeout", "request_timeout")
ATTEMPTS = 3  # should an attempt be spoiled (see the test)
SEND_MARGIN_S = 3  # the third request's time to reach the gateway over an open connection


def rejections(server: Server, reason: str) -> float:
    return server.metric("hermes_rejections_total", key="tester", reason=reason)


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


@pytest.mark.usefixtures("slot_free")
def test_queue_full_is_503_queue_wait_is_504_and_request_timeout_is_504(server: Server) -> None:
    """Concurrency 1, queue 1: the running request times out, the queued one waits too long,
    and a third is refused at once.

    Each request is sent once the gateway reports the state it is meant to meet (one running,
    then one queued too), on a connection opened just before. The third must reach the gateway
    within the queued one's 10 s: an attempt where opening its connection, seeing the queue or
    this process itself took too long for that says nothing of the gateway, and is made again.
    Wrong fates in an attempt not so spoiled fail at once."""
    for attempt in range(1, ATTEMPTS + 1):
        rejected_before = [rejections(server, code) for code in FATES]
        began = time.monotonic()
        calls = _fill_the_gateway(server)
        fates = [call.fate for call in calls]
        spoiled = _spoiled(calls, WATCH.stalled(began))
        if fates == list(FATES) or spoiled is None or attempt == ATTEMPTS:
            break
        print(f"attempt {attempt} spoiled: {spoiled}\n{_timeline(server, calls)}")
        assert wait_until(server.idle, 60)
    assert fates == list(FATES), f"{spoiled or fates}\n{_timeline(server, calls)}"

    refused = calls[0].reply
    assert refused is not None and int(refused.headers["retry-after"]) >= 1
    assert [call.status for call in calls] == [503, 504, 504]
    # Each fate counted once, under its own reason, as the access log and metrics say.
    assert wait_until(lambda: [rejections(server, code) for code in FATES] == [n + 1 for n in rejected_before])
    assert wait_until(server.idle), "engine request was not aborted"


@dataclass
class LongCall:
    """One long request on a connection of its own, opened (and timed) before it is sent."""

    server: Server
    opened: float = 0.0
    sent: float | None = None
    answered: float | None = None
    reply: httpx.Response | None = None

    def __call__(self, may_send: Callable[[], bool] = lambda: True) -> None:
        with self.server.http() as http:
            opening = time.monotonic()
            http.get("/health")  # the POST below goes out on this connection, already open
            self.opened = time.monotonic() - opening
            if not may_send():
                return
            self.sent = time.monotonic()
            self.reply = http.post("/v1/chat/completions", json=LONG)
            self.answered = time.monotonic()

    @property
    def status(self) -> int | None:
        return None if self.reply is None else self.reply.status_code

    @property
    def fate(self) -> str | None:
        """The error code it ended with, "ok", or None if it was never sent."""
        if self.reply is None:
            return None
        return "ok" if self.reply.status_code == 200 else str(_error(self.reply)["code"])


def _gateway_holds(server: Server) -> tuple[float, float]:
    """(running, waiting) as the gateway reports them, from one scrape."""
    scrape = server.scrape()
    return scrape.value("hermes_running_requests"), scrape.value("hermes_waiting_requests")


def _fill_the_gateway(server: Server) -> tuple[LongCall, LongCall, LongCall]:
    """Send one request to run, then one to queue, then one to be refused, each once the
    gateway shows the one before in its place. Returns the three (refused, queued, running);
    the third is not sent if it could no longer meet the second in the queue."""
    refused, queued, running = LongCall(server), LongCall(server), LongCall(server)

    def in_time() -> bool:
        # Both still in their places, and for SEND_MARGIN_S more: neither can have been sent
        # before its ``sent``, so neither has reached its time limit before then.
        if running.sent is None or queued.sent is None or _gateway_holds(server) != (1, 1):
            return False
        until = time.monotonic() + SEND_MARGIN_S
        return until - queued.sent < QUEUE_TIMEOUT_S and until - running.sent < REQUEST_TIMEOUT_S

    # A state not seen in time is not a verdict: in_time() then keeps the third from going out.
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(running)
        wait_until(lambda: _gateway_holds(server) == (1, 0), REQUEST_TIMEOUT_S)
        second = pool.submit(queued)
        wait_until(lambda: _gateway_holds(server) == (1, 1), QUEUE_TIMEOUT_S)
        refused(may_send=in_time)
    for future in (first, second):
        future.result()  # a call that raised says so here
    return refused, queued, running


def _spoiled(calls: tuple[LongCall, ...], stalled_s: float) -> str | None:
    """Why an attempt says nothing of the gateway, or None."""
    if calls[0].sent is None:
        return "the third request could not be sent while the second was surely queued"
    if stalled_s >= SEND_MARGIN_S:
        return f"this process stood still {stalled_s:.1f}s"
    return None


def _timeline(server: Server, calls: tuple[LongCall, ...]) -> str:
    """What each call did, in seconds from the first one sent, with the server's access-log
    line for it (its duration there tells when it reached the gateway)."""
    origin = min((call.sent for call in calls if call.sent is not None), default=0.0)
    ids = [call.reply.headers.get("x-request-id", "") if call.reply is not None else "" for call in calls]

    def access_log() -> list[str]:
        log = server.log.read_text(errors="replace").splitlines()
        return [next((text for text in log if found and f"id={found}" in text), "") for found in ids]

    wait_until(lambda: all(logged or not found for logged, found in zip(access_log(), ids, strict=True)), 5)
    lines = []
    for call, logged in zip(calls, access_log(), strict=True):
        sent = "not sent" if call.sent is None else f"sent {call.sent - origin:.2f}s"
        answered = "" if call.answered is None else f", answered {call.answered - origin:.2f}s"
        lines.append(f"{call.fate}: connection opened in {call.opened:.2f}s, {sent}{answered}; server: {logged}")
    return "\n".join(lines)


@pytest.mark.usefixtures("slot_free")
def test_stream_past_request_timeout_ends_with_an_error_frame(server: Server) -> None:
    started = time.monotonic()
    with server.http() as http, http.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    # Ended at its time limit, not later (less any time this process stood still).
    assert time.monotonic() - started >= REQUEST_TIMEOUT_S - 1
    assert WATCH.running_since(started) < REQUEST_TIMEOUT_S + 15
    assert '"request_timeout"' in events[-2] and events[-1] == "data: [DONE]"
    assert wait_until(server.idle)


@pytest.mark.usefixtures("slot_free")
def test_client_that_cuts_a_stream_frees_the_engine(server: Server) -> None:
    left, timed_out = rejections(server, "client_closed_request"), rejections(server, "request_timeout")
    generated = server.metric("vllm:generation_tokens_total")
    with server.http() as http, http.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as response:
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
        assert server.metric("vllm:num_requests_running") == 1
    # Leaving the block closes the connection mid-stream. Read from counters, which no slow
    # scrape can miss: the gateway ended it as a client that left (not at its time limit,
    # which would end it anyway), and the engine stopped short of the tokens it was asked
    # for (ignore_eos: it would have generated them all).
    assert wait_until(lambda: rejections(server, "client_closed_request") == left + 1, REQUEST_TIMEOUT_S * 2)
    assert rejections(server, "request_timeout") == timed_out
    assert wait_until(server.idle, 120), "engine kept generating"
    assert server.metric("vllm:generation_tokens_total") - generated < LONG["max_tokens"], "engine kept generating"


@pytest.mark.usefixtures("slot_free")
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
        left, timed_out = rejections(server, "client_closed_request"), rejections(server, "queue_timeout")
        with server.http() as http:
            http.get("/health")  # its connection opened first: the 1 s below is its wait only
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/chat/completions", json=LONG, timeout=1.0)
        # Its place is freed when it leaves, not when its queue_timeout_s ends: it is counted as
        # a client that left, never as a queue timeout. (Counters, not the queue's gauge: a
        # slow scrape cannot miss them.)
        assert wait_until(lambda: rejections(server, "client_closed_request") == left + 1, QUEUE_TIMEOUT_S * 3)
        assert rejections(server, "queue_timeout") == timed_out
        assert server.metric("hermes_waiting_requests") == 0
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
