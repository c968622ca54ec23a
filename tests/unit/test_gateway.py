"""The gateway with real policies (memory storage) in front of a fake engine."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from hermes_serve.admission import AdmissionQueue
from hermes_serve.apis import CHAT as CHAT_API
from hermes_serve.auth import KeyRing, hash_key
from hermes_serve.config import Settings, parse_settings
from hermes_serve.gateway import Gateway, MetricsGuard
from hermes_serve.limits import RateLimits
from hermes_serve.metrics import GatewayMetrics
from tests.support import asgi
from tests.support.asgi import Reply
from tests.support.fake_engine import USAGE, FakeEngine

KEY = "hs-unit-test-key"
CHAT = "/v1/chat/completions"
HELLO = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


async def call(app: Any, method: str, path: str, body: Any = None, *, key: str | None = KEY, **options: Any) -> Reply:
    return await asgi.call(app, method, path, body, key=key, **options)


def build(
    engine: FakeEngine | None = None, *, registry: CollectorRegistry | None = None, **overrides: Any
) -> tuple[Gateway, FakeEngine, Settings]:
    config: dict[str, Any] = {
        "auth": {
            "keys": [{"name": "team", "sha256": hash_key(KEY), "requests_per_minute": 100, "tokens_per_minute": 100000}]
        },
        "admission": {"max_concurrency": 1, "max_queue": 1, "queue_timeout_s": 0.2, "request_timeout_s": 1.0},
        "server": {"max_body_bytes": 2048},
    }
    for section, values in overrides.items():
        config[section] = {**config.get(section, {}), **values}
    settings = parse_settings(config)
    engine = engine or FakeEngine()
    gateway = Gateway(
        settings,
        KeyRing.from_settings(settings.auth, {}),
        RateLimits("memory://"),
        AdmissionQueue(settings.admission.max_concurrency, settings.admission.max_queue),
        GatewayMetrics(registry or CollectorRegistry()),
    )
    gateway.attach(engine, ready=lambda: True)
    return gateway, engine, settings


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


async def test_queue_full_is_503_and_queue_wait_is_504() -> None:
    registry = CollectorRegistry()
    gateway, _, _ = build(FakeEngine(delay_s=0.2), registry=registry)
    running = asyncio.create_task(call(gateway, "POST", CHAT, HELLO))
    await asyncio.sleep(0.05)
    queued = asyncio.create_task(call(gateway, "POST", CHAT, HELLO))
    await asyncio.sleep(0.05)
    refused = await call(gateway, "POST", CHAT, HELLO)
    assert refused.status == 503 and refused.error["code"] == "server_overloaded"
    assert int(refused.headers["retry-after"]) >= 1
    assert (await queued).status == 504 and (await queued).error["code"] == "queue_timeout"
    assert (await running).status == 200
    for reason in ("server_overloaded", "queue_timeout"):
        assert registry.get_sample_value("hermes_rejections_total", {"key": "team", "reason": reason}) == 1


async def test_request_timeout_before_first_byte_is_504_and_aborts() -> None:
    gateway, engine, _ = build(FakeEngine(delay_s=1.0))
    reply = await call(gateway, "POST", CHAT, HELLO)
    assert reply.status == 504 and reply.error["code"] == "request_timeout"
    assert engine.cancelled == 1 and engine.running == 0


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
    await asyncio.sleep(0.05)
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
    assert 1 <= int(refused.headers["retry-after"]) <= 60
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

    guard = MetricsGuard(bentoml_app, gateway=lambda: gateway)
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
