"""The gateway with real policies (memory storage) in front of a fake engine."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.datastructures import Headers

from hermes_serve import errors
from hermes_serve.apis import CHAT as CHAT_API
from hermes_serve.auth import KeyRing, hash_key
from hermes_serve.config import parse_settings
from hermes_serve.gateway import Front, Gateway, with_cors
from hermes_serve.ledger import Charge, Hold, MemoryLedger, StorageUnavailable, Tally
from hermes_serve.request import MAX_JSON_DEPTH
from tests.support.asgi import Reply
from tests.support.fake_engine import MODEL_ROOT, USAGE, FakeEngine
from tests.support.gateway import KEY, build, call
from tests.support.virtual import until

CHAT = "/v1/chat/completions"
HELLO = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


async def test_answers_and_sets_rate_limit_headers() -> None:
    gateway, _, _ = build()
    reply = await call(gateway, "POST", CHAT, HELLO)
    assert reply.status == 200 and reply.json()["usage"] == USAGE
    assert reply.headers["x-ratelimit-limit-requests"] == "100"
    assert reply.headers["x-ratelimit-remaining-requests"] == "99"
    assert reply.headers["x-ratelimit-limit-tokens"] == "100000"
    assert reply.headers["x-request-id"]


@pytest.mark.parametrize("key", [None, "hs-wrong"])
async def test_missing_or_wrong_key_is_401(key: str | None) -> None:
    gateway, engine, _ = build()
    reply = await call(gateway, "POST", CHAT, HELLO, key=key)
    assert reply.status == 401 and reply.error["code"] == "invalid_api_key"
    assert reply.headers["www-authenticate"] == "Bearer"
    assert engine.bodies == []


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("GET", "/v1/nothing", {}, 404, "not_found"),
        ("GET", "/sleep", {}, 404, "not_found"),  # vLLM's admin routes stay hidden
        ("DELETE", "/v1/models", {}, 405, "method_not_allowed"),
        ("POST", CHAT, {"raw": b"{not json"}, 400, "invalid_json"),
        ("POST", CHAT, {"raw": b'{"model": "\xff"}'}, 400, "invalid_json"),
        ("POST", CHAT, {"raw": b"x" * 4096}, 413, "request_too_large"),
        ("POST", CHAT, {"body": {"model": "fake", "messages": [{"role": "wizard", "content": "x"}]}}, 400, None),
    ],
)
async def test_bad_requests_get_openai_errors(
    method: str, path: str, kwargs: dict[str, Any], status: int, code: str | None
) -> None:
    gateway, engine, _ = build()
    reply = await call(gateway, method, path, **kwargs)
    assert reply.status == status
    if code:
        assert reply.error["code"] == code
    assert engine.bodies == []


@pytest.mark.parametrize(
    ("model", "status", "message"),
    [
        ("missing", 404, "The model `missing` does not exist."),
        ("unvalidated", 400, None),
        ("broken", 500, "Internal server error."),
    ],
)
async def test_engine_errors_leave_in_openai_shape(model: str, status: int, message: str | None) -> None:
    gateway, _, _ = build()
    reply = await call(gateway, "POST", CHAT, {**HELLO, "model": model})
    assert reply.status == status
    if message:
        assert reply.error["message"] == message
    assert b"Traceback" not in reply.body


async def test_health_follows_engine_readiness() -> None:
    gateway, _, settings = build()
    assert (await call(gateway, "GET", "/health", key=None)).json() == {
        "status": "ok",
        "model": settings.model.served_name,
    }
    gateway.attach(FakeEngine(), ready=lambda: False)
    assert (await call(gateway, "GET", "/health", key=None)).status == 503
    reply = await call(gateway, "POST", CHAT, HELLO)
    assert reply.status == 503 and reply.error["code"] == "model_not_ready"


async def test_stream_usage_event_is_hidden_unless_asked_and_tokens_are_charged() -> None:
    gateway, engine, _ = build(auth={"keys": [{"name": "team", "sha256": hash_key(KEY), "tokens_per_minute": 1000}]})
    hidden = await call(gateway, "POST", CHAT, {**HELLO, "stream": True})
    assert engine.bodies[-1]["stream_options"] == {"include_usage": True}
    assert b'"usage"' not in hidden.body and hidden.body.endswith(b"data: [DONE]\n\n")
    shown = await call(gateway, "POST", CHAT, {**HELLO, "stream": True, "stream_options": {"include_usage": True}})
    assert b'"usage":{' in shown.body
    # Two streams were charged their real usage; this request's estimate is reserved.
    after = await call(gateway, "POST", CHAT, HELLO)
    expected = 1000 - 2 * USAGE["total_tokens"] - CHAT_API.estimate(HELLO, 2048)
    assert after.headers["x-ratelimit-remaining-tokens"] == str(expected)


def waiting(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("hermes_waiting_requests")


async def test_queue_full_is_503_and_queue_wait_is_504() -> None:
    registry = CollectorRegistry()
    gateway, engine, _ = build(FakeEngine(delay_s=0.2), registry=registry)
    running = asyncio.create_task(call(gateway, "POST", CHAT, HELLO))
    await until(lambda: engine.running == 1)
    queued = asyncio.create_task(call(gateway, "POST", CHAT, HELLO))
    await until(lambda: waiting(registry) == 1)
    refused = await call(gateway, "POST", CHAT, HELLO)
    assert refused.status == 503 and refused.error["code"] == "server_overloaded"
    assert int(refused.headers["retry-after"]) >= 1
    assert (await queued).status == 504 and (await queued).error["code"] == "queue_timeout"
    assert (await running).status == 200
    for reason in ("server_overloaded", "queue_timeout"):
        assert registry.get_sample_value("hermes_rejections_total", {"key": "team", "reason": reason}) == 1


async def test_request_timeout_before_first_byte_is_504_and_aborts() -> None:
    registry = CollectorRegistry()
    gateway, engine, settings = build(FakeEngine(delay_s=1.0), registry=registry)
    reply = await call(gateway, "POST", CHAT, HELLO)
    assert reply.status == 504 and reply.error["code"] == "request_timeout"
    assert engine.cancelled == 1 and engine.running == 0
    # One clock: the deadline and the duration measured against it agree, exactly.
    took = registry.get_sample_value("hermes_request_duration_seconds_sum", {"route": CHAT})
    assert took == pytest.approx(settings.admission.request_timeout_s)


async def test_request_timeout_mid_stream_sends_an_error_frame_and_aborts() -> None:
    gateway, engine, _ = build(FakeEngine(delay_s=0.3, chunks=10))
    reply = await call(gateway, "POST", CHAT, {**HELLO, "stream": True})
    assert reply.status == 200
    frames = reply.body.decode().strip().split("\n\n")
    assert frames[0].startswith('data: {"choices"')
    assert json.loads(frames[-2][len("data: ") :])["error"]["code"] == "request_timeout"
    assert frames[-1] == "data: [DONE]"
    assert engine.cancelled == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_aborts_the_engine_request(stream: bool) -> None:
    gateway, engine, _ = build(FakeEngine(delay_s=0.2, chunks=20), admission={"request_timeout_s": 30})
    reply = await call(gateway, "POST", CHAT, {**HELLO, "stream": stream}, disconnect_after_s=0.1)
    assert engine.cancelled == 1 and engine.running == 0
    # A response is always started (here 499 before the first byte, or the stream's 200):
    # BentoML's timeout middleware would otherwise hold the request until traffic.timeout.
    assert reply.status == (200 if stream else 499)


async def test_a_stream_cut_short_is_charged_its_prompt_and_streamed_tokens() -> None:
    keys = [{"name": "team", "sha256": hash_key(KEY), "tokens_per_minute": 10000}]
    gateway, engine, _ = build(
        FakeEngine(delay_s=0.05, chunks=40), auth={"keys": keys}, admission={"request_timeout_s": 30}
    )
    body = {**HELLO, "stream": True}
    cut = await call(gateway, "POST", CHAT, body, disconnect_after_s=0.28)
    streamed = cut.body.count(b"data: ")
    assert engine.cancelled == 1 and 3 <= streamed < 40
    after = await call(gateway, "POST", CHAT, HELLO)
    charged = CHAT_API.prompt_tokens(body, 2048) + streamed
    assert after.headers["x-ratelimit-remaining-tokens"] == str(10000 - charged - CHAT_API.estimate(HELLO, 2048))


async def test_client_disconnect_while_queued_frees_the_place() -> None:
    gateway, engine, _ = build(FakeEngine(delay_s=0.1), admission={"queue_timeout_s": 10, "request_timeout_s": 30})
    running = asyncio.create_task(call(gateway, "POST", CHAT, HELLO))
    await until(lambda: engine.running == 1)
    gave_up = await call(gateway, "POST", CHAT, HELLO, disconnect_after_s=0.05)  # while queued
    assert gave_up.status == 499 and gave_up.error["code"] == "client_closed_request"
    third = await call(gateway, "POST", CHAT, HELLO)  # the queue place is free again
    assert third.status == 200 and (await running).status == 200
    assert len(engine.bodies) == 2


async def test_rate_limit_is_429_with_retry_after() -> None:
    gateway, _, _ = build(auth={"keys": [{"name": "team", "sha256": hash_key(KEY), "requests_per_minute": 2}]})
    for _ in range(2):
        assert (await call(gateway, "POST", CHAT, HELLO)).status == 200
    refused = await call(gateway, "POST", CHAT, HELLO)
    assert refused.status == 429 and refused.error["code"] == "rate_limit_exceeded"
    # A rolling minute counted as two (the last one weighted): it frees within two minutes.
    assert 1 <= int(refused.headers["retry-after"]) <= 120
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


async def test_non_generation_routes_need_a_key_and_pass_through() -> None:
    gateway, _, _ = build()
    assert (await call(gateway, "GET", "/v1/models", key=None)).status == 401
    assert (await call(gateway, "GET", "/v1/models")).json()["data"][0]["id"] == "fake"


@pytest.mark.parametrize(
    ("required", "key", "status"), [(False, None, 200), (True, None, 401), (True, KEY, 200), (True, "hs-bad", 401)]
)
async def test_metrics_guard(required: bool, key: str | None, status: int) -> None:
    gateway, _, _ = build(auth={"metrics_require_key": required})

    async def bentoml_app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"# metrics"})

    guard = Front(bentoml_app, gateway_app=gateway, gateway=lambda: gateway)
    reply = await call(guard, "GET", "/metrics", key=key)  # type: ignore[arg-type]
    assert reply.status == status
    if status == 401:
        assert reply.error["code"] == "invalid_api_key"


async def test_websockets_are_refused() -> None:
    gateway, _, _ = build()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await gateway({"type": "websocket", "path": CHAT, "headers": []}, None, send)  # type: ignore[arg-type]
    assert sent == [{"type": "websocket.close", "code": 1008}]


# --- every generation API through the same path ---------------------------------------------

RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"
ASK = {
    CHAT: HELLO,
    "/v1/completions": {"model": "fake", "prompt": "hi", "max_tokens": 5},
    RESPONSES: {"model": "fake", "input": "hi", "max_output_tokens": 5},
    MESSAGES: {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
}
ANTHROPIC_ERROR = {"type", "error"}


def tokens_charged(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("hermes_tokens_total", {"key": "team"})


@pytest.mark.parametrize("path", list(ASK))
@pytest.mark.parametrize("stream", [False, True])
async def test_each_api_is_charged_the_usage_the_engine_reported(path: str, stream: bool) -> None:
    registry = CollectorRegistry()
    gateway, engine, _ = build(registry=registry)
    reply = await call(gateway, "POST", path, {**ASK[path], "stream": stream})
    assert reply.status == 200
    assert tokens_charged(registry) == USAGE["total_tokens"]
    assert registry.get_sample_value("hermes_requests_total", {"key": "team", "route": path, "status": "200"}) == 1
    if stream:
        assert reply.headers["content-type"].startswith("text/event-stream")
        assert len(reply.chunks) > engine.chunks


@pytest.mark.parametrize("path", list(ASK))
async def test_each_api_cut_short_is_charged_its_prompt_and_streamed_tokens(path: str) -> None:
    registry = CollectorRegistry()
    gateway, engine, _ = build(
        FakeEngine(delay_s=0.05, chunks=40), registry=registry, admission={"request_timeout_s": 30}
    )
    reply = await call(gateway, "POST", path, {**ASK[path], "stream": True}, disconnect_after_s=0.28)
    assert engine.cancelled == 1
    streamed = reply.body.count(b"delta\ndata: ") if path in (RESPONSES, MESSAGES) else reply.body.count(b"data: ")
    assert 3 <= streamed < 40
    prompt = gateway_api(path).prompt_tokens({**ASK[path], "stream": True}, 2048)
    assert tokens_charged(registry) == prompt + streamed


def gateway_api(path: str) -> Any:
    from hermes_serve import routes

    found = routes.find(path)
    assert found is not None and found[0].api is not None
    return found[0].api


@pytest.mark.parametrize("path", [RESPONSES, MESSAGES])
async def test_each_api_ends_a_stream_past_its_timeout_with_its_own_error_event(path: str) -> None:
    gateway, engine, _ = build(FakeEngine(delay_s=0.3, chunks=10))
    reply = await call(gateway, "POST", path, {**ASK[path], "stream": True})
    assert reply.status == 200 and engine.cancelled == 1
    last = reply.body.decode().strip().split("\n\n")[-1]
    name, data = last.split("\n", 1)
    assert name == "event: error"
    error = json.loads(data.removeprefix("data: "))
    if path == MESSAGES:
        assert error == {"type": "error", "error": {"type": "timeout_error", "message": error["error"]["message"]}}
    else:
        assert error["type"] == "error" and error["code"] == "request_timeout"
        assert error["sequence_number"] == reply.body.count(b"data: ") - 1


async def test_responses_are_never_stored_nor_retrieved() -> None:
    gateway, engine, _ = build()
    assert (await call(gateway, "POST", RESPONSES, {**ASK[RESPONSES], "store": True})).status == 200
    assert engine.bodies[-1]["store"] is False
    chained = await call(gateway, "POST", RESPONSES, {**ASK[RESPONSES], "previous_response_id": "resp_1"})
    assert chained.status == 400 and chained.error["code"] == "unsupported_parameter"
    assert chained.error["param"] == "previous_response_id"
    for method, path in [
        ("GET", "/v1/responses/resp_1"),
        ("DELETE", "/v1/responses/resp_1"),
        ("POST", "/v1/responses/resp_1/cancel"),
    ]:
        refused = await call(gateway, method, path)
        assert refused.status == 404 and refused.error["code"] == "response_not_found"
    assert (await call(gateway, "GET", "/v1/responses/resp_1", key=None)).status == 401
    assert len(engine.bodies) == 1


async def test_anthropic_clients_send_x_api_key_and_get_anthropic_errors() -> None:
    gateway, _, _ = build(auth={"keys": [{"name": "team", "sha256": hash_key(KEY), "requests_per_minute": 1}]})
    ok = await call(gateway, "POST", MESSAGES, ASK[MESSAGES], key=None, headers={"x-api-key": KEY})
    assert ok.status == 200 and ok.json()["usage"] == {"input_tokens": 10, "output_tokens": 5}
    limited = await call(gateway, "POST", MESSAGES, ASK[MESSAGES], key=None, headers={"x-api-key": KEY})
    assert limited.status == 429 and limited.json()["error"]["type"] == "rate_limit_error"
    assert set(limited.json()) == ANTHROPIC_ERROR and limited.json()["type"] == "error"
    assert int(limited.headers["retry-after"]) >= 1
    wrong = await call(gateway, "POST", MESSAGES, ASK[MESSAGES], key=None, headers={"x-api-key": "hs-wrong"})
    assert wrong.status == 401 and wrong.json()["error"]["type"] == "authentication_error"
    counted = await call(
        gateway, "POST", "/v1/messages/count_tokens", ASK[MESSAGES], key=None, headers={"x-api-key": KEY}
    )
    assert counted.status == 200 and counted.json() == {"input_tokens": 7}, "count_tokens is not generation"


@pytest.mark.parametrize(("path", "anthropic"), [(CHAT, False), (RESPONSES, False), (MESSAGES, True)])
async def test_engine_errors_use_one_vocabulary_in_each_apis_shape(path: str, anthropic: bool) -> None:
    gateway, _, _ = build()
    missing = await call(gateway, "POST", path, {**ASK[path], "model": "missing"})
    assert missing.status == 404
    if anthropic:
        assert missing.json() == {
            "type": "error",
            "error": {"type": "not_found_error", "message": "The model `missing` does not exist."},
        }
    else:
        assert missing.error == {
            "message": "The model `missing` does not exist.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    unvalidated = await call(gateway, "POST", path, {**ASK[path], "model": "unvalidated"})
    assert unvalidated.status == 400
    if not anthropic:
        assert unvalidated.error["type"] == "invalid_request_error" and unvalidated.error["code"] is None


async def test_models_hide_the_server_path_and_answer_one_model() -> None:
    gateway, _, _ = build()
    listing = await call(gateway, "GET", "/v1/models")
    assert [m["root"] for m in listing.json()["data"]] == ["fake"]
    assert MODEL_ROOT.encode() not in listing.body
    one = await call(gateway, "GET", "/v1/models/fake")
    assert one.status == 200 and one.json()["id"] == "fake" and one.json()["root"] == "fake"
    assert int(one.headers["content-length"]) == len(one.body)
    missing = await call(gateway, "GET", "/v1/models/org/not-here")
    assert (
        missing.status == 404
        and missing.error["code"] == "model_not_found"
        and "org/not-here" in missing.error["message"]
    )


async def test_method_not_allowed_says_which_are() -> None:
    gateway, _, _ = build()
    reply = await call(gateway, "DELETE", CHAT)
    assert reply.status == 405 and reply.headers["allow"] == "POST"


@pytest.mark.parametrize("path", [CHAT, "/v1/messages/count_tokens"])
async def test_the_engine_is_told_the_length_of_the_body_it_reads(path: str) -> None:
    gateway, engine, _ = build()
    asked = ASK[MESSAGES] if path.startswith("/v1/messages") else HELLO
    assert (await call(gateway, "POST", path, {**asked, "cache_salt": "x" * 300})).status == 200
    rewritten = json.dumps(engine.bodies[-1], ensure_ascii=False).encode()
    assert engine.headers[-1]["content-length"] == str(len(rewritten))


async def test_the_engine_gets_the_gateways_request_id_never_the_clients() -> None:
    gateway, engine, _ = build()
    reply = await call(gateway, "POST", CHAT, HELLO, headers={"x-request-id": "client-chosen"})
    assert reply.headers["x-request-id"] != "client-chosen"
    assert engine.headers[-1]["x-request-id"] == reply.headers["x-request-id"]
    listing = await call(gateway, "GET", "/v1/models")
    assert engine.headers[-1]["x-request-id"] == listing.headers["x-request-id"]


# --- keys that change, expire, and see their own standing ---------------------------------


def keyring(*keys: dict[str, Any]) -> KeyRing:
    return KeyRing.from_settings(parse_settings({"auth": {"keys": list(keys)}}).auth, {})


async def test_new_keys_apply_at_once_and_a_removed_keys_queued_requests_are_refused() -> None:
    other = "hs-other-key"
    registry = CollectorRegistry()
    gateway, engine, _ = build(
        FakeEngine(delay_s=0.1, chunks=5),
        registry=registry,
        admission={"queue_timeout_s": 10, "request_timeout_s": 30},
    )
    assert (await call(gateway, "POST", CHAT, HELLO, key=other)).status == 401
    running = asyncio.create_task(call(gateway, "POST", CHAT, {**HELLO, "stream": True}))
    await until(lambda: engine.running == 1)
    queued = asyncio.create_task(call(gateway, "POST", CHAT, HELLO))
    await until(lambda: waiting(registry) == 1)
    gateway.use_keys(keyring({"name": "other", "sha256": hash_key(other)}))  # "team" is gone
    refused = await queued
    assert (
        refused.status == 401 and refused.error["code"] == "invalid_api_key" and "revoked" in refused.error["message"]
    )
    finished = await running
    assert finished.status == 200 and finished.body.endswith(b"data: [DONE]\n\n"), "running requests are never cut"
    assert (await call(gateway, "POST", CHAT, HELLO)).status == 401
    assert (await call(gateway, "POST", CHAT, HELLO, key=other)).status == 200
    assert len(engine.bodies) == 2


async def test_an_expired_key_is_refused() -> None:
    now = [1_000.0]
    expiring = {"name": "team", "sha256": hash_key(KEY), "expires_at": "1970-01-01T00:20:00Z"}
    gateway, engine, _ = build(auth={"keys": [expiring]}, wall_clock=lambda: now[0])
    assert (await call(gateway, "POST", CHAT, HELLO)).status == 200
    now[0] = 1_200.0
    expired = await call(gateway, "POST", CHAT, HELLO)
    assert expired.status == 401 and "expired" in expired.error["message"]
    assert (await call(gateway, "GET", "/v1/usage")).status == 401
    assert len(engine.bodies) == 1


async def test_usage_shows_the_calling_keys_own_standing() -> None:
    limits = {
        "requests_per_minute": 10,
        "tokens_per_minute": 1000,
        "tokens_per_day": 5000,
        "expires_at": "2099-01-01T00:00:00Z",
    }
    gateway, _, _ = build(
        auth={
            "keys": [
                {"name": "team", "sha256": hash_key(KEY), **limits},
                {"name": "free", "sha256": hash_key("hs-free")},
            ]
        }
    )
    await call(gateway, "POST", CHAT, HELLO)
    usage = (await call(gateway, "GET", "/v1/usage")).json()
    assert usage["key"] == "team" and usage["expires_at"] == "2099-01-01T00:00:00Z"
    assert set(usage["limits"]) == {"requests_per_minute", "tokens_per_minute", "tokens_per_day"}
    tokens = usage["limits"]["tokens_per_day"]
    assert (tokens["used"], tokens["reserved"], tokens["remaining"], tokens["limit"]) == (
        USAGE["total_tokens"],
        0,
        5000 - 15,
        5000,
    )
    assert tokens["window"] == "calendar day (UTC)" and tokens["resets_at"].endswith("T00:00:00Z")
    assert usage["limits"]["requests_per_minute"]["used"] == 1
    assert (await call(gateway, "GET", "/v1/usage", key="hs-free")).json() == {
        "object": "usage",
        "key": "free",
        "admin": False,
        "expires_at": None,
        "limits": {},
        "usage": None,  # this gateway records no usage
    }
    assert (await call(gateway, "GET", "/v1/usage", key=None)).status == 401


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_has_its_whole_answer_already_sees_its_tokens_in_its_standing(stream: bool) -> None:
    """Read-your-writes: the answer's last message waits for the tokens to be settled."""
    gateway, _, _ = build(auth={"keys": [{"name": "team", "sha256": hash_key(KEY), "tokens_per_day": 5000}]})
    seen: list[dict[str, Any]] = []

    async def standing() -> None:
        seen.append((await call(gateway, "GET", "/v1/usage")).json()["limits"]["tokens_per_day"])

    body = {**HELLO, "stream": True, "stream_options": {"include_usage": True}} if stream else HELLO
    reply = await call(gateway, "POST", CHAT, body, on_end=standing)
    assert reply.status == 200
    assert (seen[0]["used"], seen[0]["reserved"]) == (USAGE["total_tokens"], 0)


async def test_a_day_budget_is_429_insufficient_quota_without_sdk_retries() -> None:
    gateway, engine, _ = build(auth={"keys": [{"name": "team", "sha256": hash_key(KEY), "tokens_per_day": 2100}]})
    assert (await call(gateway, "POST", CHAT, {**HELLO, "max_tokens": 1000})).status == 200
    refused = await call(gateway, "POST", CHAT, {**HELLO, "max_tokens": 2090})
    assert (
        refused.status == 429
        and refused.error["code"] == "insufficient_quota"
        and refused.error["type"] == "insufficient_quota"
    )
    assert refused.headers["x-should-retry"] == "false" and int(refused.headers["retry-after"]) > 0
    assert len(engine.bodies) == 1


# --- browsers ------------------------------------------------------------------------------

APP_ORIGIN = "https://app.example.com"
PREFLIGHT = {
    "origin": APP_ORIGIN,
    "access-control-request-method": "POST",
    "access-control-request-headers": "authorization, content-type, x-stainless-os",
}


async def test_cors_is_closed_unless_an_origin_is_listed() -> None:
    gateway, _, _ = build()
    closed = with_cors(gateway, [])
    preflight = await call(closed, "OPTIONS", CHAT, key=None, headers=PREFLIGHT)
    assert preflight.status == 405 and "access-control-allow-origin" not in preflight.headers
    reply = await call(closed, "POST", CHAT, HELLO, headers={"origin": APP_ORIGIN})
    assert reply.status == 200 and "access-control-allow-origin" not in reply.headers


async def test_cors_for_a_listed_origin() -> None:
    gateway, _, _ = build()
    app = with_cors(gateway, [APP_ORIGIN])
    preflight = await call(app, "OPTIONS", CHAT, key=None, headers=PREFLIGHT)
    assert preflight.status == 200
    assert preflight.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "x-stainless-os" in preflight.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in preflight.headers
    reply = await call(app, "POST", CHAT, HELLO, headers={"origin": APP_ORIGIN})
    assert reply.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "x-ratelimit-remaining-tokens" in reply.headers["access-control-expose-headers"]
    other = await call(app, "OPTIONS", CHAT, key=None, headers={**PREFLIGHT, "origin": "https://evil.example"})
    assert other.status == 400 and "access-control-allow-origin" not in other.headers


async def test_an_engine_that_dies_mid_stream_ends_it_with_our_error_event() -> None:
    gateway, _, _ = build()
    reply = await call(gateway, "POST", CHAT, {**HELLO, "model": "dies", "stream": True})
    frames = reply.body.decode().strip().split("\n\n")
    assert frames[0].startswith('data: {"choices"')
    error = json.loads(frames[-2].removeprefix("data: "))["error"]
    assert (
        error["code"] == "engine_failed" and error["type"] == "server_error" and "stack trace" not in error["message"]
    )
    assert frames[-1] == "data: [DONE]" and reply.body.count(b"[DONE]") == 1


async def test_a_request_whose_engine_died_is_503_model_not_ready() -> None:
    alive = [True]
    gateway, engine, _ = build()
    gateway.attach(engine, ready=lambda: alive[0])
    assert (await call(gateway, "POST", CHAT, {**HELLO, "model": "dies"})).status == 500  # the engine lives: a real 500
    engine_calls = len(engine.bodies)

    async def dying_engine(scope: Any, receive: Any, send: Any) -> None:
        alive[0] = False  # it dies while answering
        await engine(scope, receive, send)

    gateway.attach(dying_engine, ready=lambda: alive[0])
    alive[0] = True
    reply = await call(gateway, "POST", CHAT, {**HELLO, "model": "dies"})
    assert reply.status == 503 and reply.error["code"] == "model_not_ready" and reply.headers["retry-after"]
    assert len(engine.bodies) == engine_calls + 1


async def test_every_path_but_bentomls_own_is_the_gateways() -> None:
    gateway, _, _ = build()

    async def bentoml_app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"Not Found"})

    front = Front(bentoml_app, gateway_app=gateway, gateway=lambda: gateway)
    odd = await call(front, "GET", "/v1/responses/a\nb")
    assert odd.status == 404 and odd.error["code"] in {"response_not_found", "not_found"}
    assert (await call(front, "GET", "/docs")).error["code"] == "not_found"
    assert (await call(front, "GET", "/readyz")).body == b"Not Found", "BentoML's probes stay BentoML's"


async def test_the_console_is_served_with_a_strict_content_security_policy() -> None:
    gateway, _, _ = build()
    page = await call(gateway, "GET", "/", key=None)
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert b'<script src="/console/console.js"' in page.body and b"<script>" not in page.body, "no inline script"
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    script = await call(gateway, "GET", "/console/console.js", key=None)
    assert script.status == 200 and script.headers["content-type"].startswith("text/javascript")
    assert (
        b"sessionStorage" in script.body
        and b"localStorage" not in script.body
        and b"document.cookie" not in script.body
    )
    for path in ["/console/../config.py", "/console/missing.js", "/console/console.py"]:
        assert (await call(gateway, "GET", path, key=None)).status == 404, path


async def test_health_not_ready_is_the_same_503_as_every_route_gives() -> None:
    gateway, _, _ = build()
    gateway.attach(FakeEngine(), ready=lambda: False)
    reply = await call(gateway, "GET", "/health", key=None)
    assert reply.status == 503 and reply.error["code"] == "model_not_ready" and reply.headers["retry-after"] == "5"


# --- every refusal is counted, under its code ----------------------------------------------------


class Gate:
    """An engine that holds each request at its door until opened: a request stays running
    exactly as long as a test needs, with no duration involved."""

    def __init__(self) -> None:
        self.engine = FakeEngine()
        self.entered = asyncio.Event()
        self.opened = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.entered.set()
        await self.opened.wait()
        await self.engine(scope, receive, send)


def gated(registry: CollectorRegistry, **overrides: Any) -> tuple[Gateway, Gate]:
    gateway, _, _ = build(registry=registry, **overrides)
    gate = Gate()
    gateway.attach(gate, ready=lambda: True)
    return gateway, gate


async def while_one_runs(gateway: Gateway, gate: Gate, first: dict[str, Any] = HELLO) -> Reply:
    """A second request while a first one is inside the engine."""
    running = asyncio.create_task(call(gateway, "POST", CHAT, first))
    await gate.entered.wait()
    try:
        return await call(gateway, "POST", CHAT, HELLO)
    finally:
        gate.opened.set()
        assert (await running).status == 200


class UnreachableLedger(MemoryLedger):
    async def admit(self, key: str, charges: list[Charge], hold: Hold | None, now: float) -> Tally:
        raise StorageUnavailable("connection refused")


def team(**limits: Any) -> dict[str, Any]:
    return {"keys": [{"name": "team", "sha256": hash_key(KEY), **limits}]}


async def wrong_key(registry: CollectorRegistry) -> Reply:
    gateway, _, _ = build(registry=registry)
    return await call(gateway, "POST", CHAT, HELLO, key="hs-wrong")


async def over_the_minute(registry: CollectorRegistry) -> Reply:
    gateway, _, _ = build(registry=registry, auth=team(requests_per_minute=1))
    assert (await call(gateway, "POST", CHAT, HELLO)).status == 200
    return await call(gateway, "POST", CHAT, HELLO)


async def over_the_day(registry: CollectorRegistry) -> Reply:
    gateway, _, _ = build(registry=registry, auth=team(tokens_per_day=100))
    return await call(gateway, "POST", CHAT, {**HELLO, "max_tokens": 500})


async def client_leaves(registry: CollectorRegistry) -> Reply:
    gateway, _ = gated(registry)
    return await call(gateway, "POST", CHAT, HELLO, disconnect_after_s=0.05)


async def engine_not_ready(registry: CollectorRegistry) -> Reply:
    gateway, _, _ = build(registry=registry)
    gateway.attach(FakeEngine(), ready=lambda: False)
    return await call(gateway, "POST", CHAT, HELLO)


async def queue_full(registry: CollectorRegistry) -> Reply:
    return await while_one_runs(*gated(registry, admission={"max_queue": 0}))


async def storage_down(registry: CollectorRegistry) -> Reply:
    gateway, _, _ = build(registry=registry, ledger=UnreachableLedger())
    return await call(gateway, "POST", CHAT, HELLO)


async def queued_too_long(registry: CollectorRegistry) -> Reply:
    return await while_one_runs(*gated(registry))  # one place in the queue, none free


async def running_too_long(registry: CollectorRegistry) -> Reply:
    gateway, _ = gated(registry)  # never opened
    return await call(gateway, "POST", CHAT, HELLO)


PROVOKE: dict[str, Callable[[CollectorRegistry], Awaitable[Reply]]] = {
    "invalid_api_key": wrong_key,
    "rate_limit_exceeded": over_the_minute,
    "insufficient_quota": over_the_day,
    "client_closed_request": client_leaves,
    "model_not_ready": engine_not_ready,
    "server_overloaded": queue_full,
    "limits_unavailable": storage_down,
    "queue_timeout": queued_too_long,
    "request_timeout": running_too_long,
}


def rejections(registry: CollectorRegistry, reason: str) -> float:
    """``hermes_rejections_total`` for ``reason``, whichever key (an unknown one is "unknown")."""
    return sum(
        sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == "hermes_rejections_total" and sample.labels["reason"] == reason
    )


def test_every_refusal_in_the_table_is_provoked_below() -> None:
    assert set(PROVOKE) == errors.REFUSALS, "a new refusal needs a way to provoke it here"


@pytest.mark.parametrize("code", sorted(errors.REFUSALS))
async def test_every_refusal_is_answered_and_counted_under_its_code(code: str) -> None:
    registry = CollectorRegistry()
    reply = await PROVOKE[code](registry)
    assert reply.status == errors.CODES[code].status and reply.error["code"] == code
    assert rejections(registry, code) == 1


# --- a client's own request id --------------------------------------------------------------------


async def test_a_clients_request_id_is_logged_beside_ours_and_never_reaches_the_engine(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway, engine, _ = build()
    theirs = 'job-7 "retry 2"'
    with caplog.at_level(logging.INFO, logger="hermes_serve.access"):
        reply = await call(gateway, "POST", CHAT, HELLO, headers={"X-Client-Request-Id": theirs})
    assert reply.status == 200
    ours = reply.headers["x-request-id"]
    assert ours != theirs and engine.headers[-1]["x-request-id"] == ours
    assert "x-client-request-id" not in engine.headers[-1]
    assert theirs not in json.dumps(engine.bodies[-1]) and theirs not in json.dumps(engine.headers[-1])
    line = caplog.records[-1].getMessage()
    assert line.startswith(f'id={ours} client_request_id="job-7 \\"retry 2\\"" key=team POST {CHAT} status=200')


@pytest.mark.parametrize("value", ["x" * 513, "caf\u00e9", "tab\there"])
@pytest.mark.parametrize("path", [CHAT, MESSAGES, "/v1/models"])
async def test_a_bad_client_request_id_is_a_400_in_the_apis_shape(value: str, path: str) -> None:
    gateway, engine, _ = build()
    method, body = ("GET", None) if path == "/v1/models" else ("POST", ASK[path])
    reply = await call(gateway, method, path, body, headers={"X-Client-Request-Id": value})
    assert reply.status == 400
    if path == MESSAGES:
        assert reply.json()["error"]["type"] == "invalid_request_error" and "X-Client-Request-Id" in reply.body.decode()
    else:
        assert reply.error["code"] == "invalid_client_request_id"
    assert engine.headers == []
    assert (await call(gateway, method, path, body, headers={"X-Client-Request-Id": "x" * 512})).status == 200


# --- bounds on what one request may ask --------------------------------------------------------------


def nested_body(path: str, depth: int) -> bytes:
    """The API's request with one more field, ``x``, nested so the whole body is ``depth`` deep
    (written as text: a list that deep cannot even be built by json.dumps)."""
    opening = json.dumps(ASK[path])[:-1]
    return f'{opening}, "x": {"[" * (depth - 1)}{"]" * (depth - 1)}}}'.encode()


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1, 1000, 100_000])
async def test_a_body_nested_too_deep_is_a_400_in_the_apis_shape_and_nothing_recurses(
    path: str, depth: int, caplog: pytest.LogCaptureFixture
) -> None:
    gateway, engine, _ = build(server={"max_body_bytes": 1_000_000})
    reply = await call(gateway, "POST", path, raw=nested_body(path, depth))
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR], "no traceback"
    if depth <= MAX_JSON_DEPTH:
        assert reply.status == 200  # re-encoded, estimated and parsed by the engine, whole
        assert engine.bodies[-1]["x"] == json.loads(nested_body(path, depth))["x"]
        return
    assert reply.status == 400 and engine.bodies == []
    message = f"The request body nests arrays or objects more than {MAX_JSON_DEPTH} levels deep."
    if path == MESSAGES:
        assert reply.json() == {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    else:
        assert reply.error == {
            "message": message,
            "type": "invalid_request_error",
            "param": None,
            "code": "nesting_too_deep",
        }


@pytest.mark.parametrize(
    ("path", "extra", "code", "param"),
    [
        (CHAT, {"n": 17}, "integer_above_max_value", "n"),
        ("/v1/completions", {"n": 256}, "integer_above_max_value", "n"),
        ("/v1/completions", {"best_of": 17}, "integer_above_max_value", "best_of"),
        (CHAT, {"n": "256"}, "invalid_type", "n"),
        (CHAT, {"n": 256.0}, "invalid_type", "n"),
    ],
)
async def test_n_is_capped_by_server_max_n(path: str, extra: dict[str, Any], code: str, param: str) -> None:
    gateway, engine, settings = build()
    reply = await call(gateway, "POST", path, {**ASK[path], **extra})
    assert reply.status == 400 and (reply.error["code"], reply.error["param"]) == (code, param)
    assert engine.bodies == []
    assert settings.server.max_n == 16
    assert (await call(gateway, "POST", path, {**ASK[path], "n": 16})).status == 200, "heavier than the cap: alone"
    capped, _, _ = build(server={"max_n": 2})
    assert (await call(capped, "POST", path, {**ASK[path], "n": 3})).error["param"] == "n"


async def test_a_request_holds_an_engine_slot_per_sequence() -> None:
    # Two slots, no queue: a request asking for n=2 leaves no room for another.
    gateway, gate = gated(CollectorRegistry(), admission={"max_concurrency": 2, "max_queue": 0})
    refused = await while_one_runs(gateway, gate, first={**HELLO, "n": 2})
    assert refused.status == 503 and refused.error["code"] == "server_overloaded"


async def test_two_different_keys_in_one_request_are_refused_the_same_key_twice_is_not() -> None:
    other = "hs-other-key"
    keys = [{"name": "team", "sha256": hash_key(KEY)}, {"name": "other", "sha256": hash_key(other)}]
    gateway, engine, _ = build(auth={"keys": keys, "metrics_require_key": True})
    both = await call(gateway, "POST", CHAT, HELLO, headers={"x-api-key": other})  # and Bearer KEY
    assert both.status == 401 and both.error["code"] == "invalid_api_key" and "Two different" in both.error["message"]
    assert both.headers["www-authenticate"] == "Bearer"
    anthropic = await call(gateway, "POST", MESSAGES, ASK[MESSAGES], headers={"x-api-key": other})
    assert anthropic.status == 401 and anthropic.json()["error"]["type"] == "authentication_error"
    assert engine.bodies == []
    assert (await call(gateway, "POST", CHAT, HELLO, headers={"x-api-key": KEY})).status == 200
    assert not gateway.may_read_metrics(Headers({"authorization": f"Bearer {KEY}", "x-api-key": other}))
    assert gateway.may_read_metrics(Headers({"authorization": f"Bearer {KEY}", "x-api-key": KEY}))
