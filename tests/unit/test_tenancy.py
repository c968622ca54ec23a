"""What reaches the engine: the gateway's salt, priority and request id; never the client's."""

from __future__ import annotations

from typing import Any

import pytest

from hermes_serve.auth import Principal, hash_key
from hermes_serve.tenancy import CLIENT_FIELDS, CLIENT_HEADERS, TENANT_HEADERS, Tenancy
from tests.support.fake_engine import FakeEngine
from tests.support.gateway import KEY, build, call

OTHER = "hs-other-key"
HELLO = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
ASK = {
    "/v1/chat/completions": HELLO,
    "/v1/completions": {"model": "fake", "prompt": "hi", "max_tokens": 5},
    "/v1/responses": {"model": "fake", "input": "hi", "max_output_tokens": 5},
    "/v1/messages": {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
}
MEDDLING_FIELDS = {
    "cache_salt": "steal-me",
    "priority": -1000,
    "request_id": "mine",
    "kv_transfer_params": {"do_remote_prefill": True, "remote_host": "10.0.0.9"},
    "session_id": "someone-elses",
    "vllm_xargs": {"session_id": "someone-elses"},
}
MEDDLING_HEADERS = {
    "X-Vllm-Priority": "-1000",
    "X-Request-Id": "mine",
    "X-data-parallel-rank": "3",
    "X-Session-ID": "s",
    "X-Client-Request-Id": "the-clients-own",
    "X-Tenant-ID": "another-keys-tenant",  # a router would send it to another key's engines
    "x-llm-d-inference-fairness-id": "another-keys-share",
    "X-User-ID": "u",
}


def keys(*extra: dict[str, Any]) -> dict[str, Any]:
    return {"keys": [{"name": "team", "sha256": hash_key(KEY), "priority": 5}, *extra]}


@pytest.mark.parametrize("path", list(ASK))
async def test_the_engine_gets_the_gateways_fields_and_headers_never_the_clients(path: str) -> None:
    gateway, engine, _ = build(auth=keys())
    reply = await call(gateway, "POST", path, {**ASK[path], **MEDDLING_FIELDS}, headers=MEDDLING_HEADERS)
    assert reply.status == 200
    body, headers = engine.bodies[-1], engine.headers[-1]
    assert not (set(body) & (set(CLIENT_FIELDS) - {"cache_salt"}))
    assert body["cache_salt"] != "steal-me" and len(body["cache_salt"]) == 64
    assert headers["x-vllm-priority"] == "-5", "the key's priority, in vLLM's order (lower runs first)"
    assert headers["x-request-id"] == reply.headers["x-request-id"]
    owned = {"x-vllm-priority", "x-request-id", *TENANT_HEADERS}
    assert not {h for h in headers if h in CLIENT_HEADERS} - owned
    assert "x-data-parallel-rank" not in headers and "x-session-id" not in headers and "x-user-id" not in headers
    tenant = headers["x-tenant-id"]
    assert tenant == headers["x-llm-d-inference-fairness-id"] and len(tenant) == 32
    assert tenant not in ("another-keys-tenant", "team") and tenant not in body["cache_salt"]
    assert "authorization" not in headers and "x-api-key" not in headers, "the client's key reached the engine"
    assert all(KEY not in value for value in headers.values())


async def test_each_key_has_its_own_salt_and_a_group_shares_one() -> None:
    gateway, engine, _ = build(
        auth=keys(
            {"name": "other", "sha256": hash_key(OTHER)},
            {"name": "a", "sha256": hash_key("hs-a"), "share_cache_with": "team-x"},
            {"name": "b", "sha256": hash_key("hs-b"), "share_cache_with": "team-x"},
        )
    )
    salts = {}
    for name, key in [("team", KEY), ("team-again", KEY), ("other", OTHER), ("a", "hs-a"), ("b", "hs-b")]:
        await call(gateway, "POST", "/v1/chat/completions", HELLO, key=key)
        salts[name] = engine.bodies[-1]["cache_salt"]
    assert salts["team"] == salts["team-again"], "a key always reuses its own cache"
    assert salts["team"] != salts["other"]
    assert salts["a"] == salts["b"] != salts["team"]


def test_salts_cannot_be_derived_without_this_processs_secret() -> None:
    key = Principal("team")
    assert Tenancy(b"1" * 32).salt(key) != Tenancy(b"2" * 32).salt(key)
    assert Tenancy().salt(key) != Tenancy().salt(key)


def test_replicas_sharing_a_secret_name_a_key_alike_and_a_cache_group_is_one_tenant() -> None:
    a, b = Tenancy(b"shared"), Tenancy(b"shared")
    team, grouped, also = Principal("team"), Principal("x", cache_group="g"), Principal("y", cache_group="g")
    assert a.salt(team) == b.salt(team) and a.tenant(team) == b.tenant(team)
    assert a.tenant(grouped) == b.tenant(also) != a.tenant(team)
    assert Tenancy(b"other").tenant(team) != a.tenant(team)


async def test_a_model_the_key_may_not_use_answers_like_one_that_does_not_exist() -> None:
    limited = {"name": "team", "sha256": hash_key(KEY), "models": ["fake"]}
    gateway, engine, _ = build(FakeEngine(), auth={"keys": [limited, {"name": "other", "sha256": hash_key(OTHER)}]})
    assert (await call(gateway, "POST", "/v1/chat/completions", HELLO)).status == 200
    hidden = await call(gateway, "POST", "/v1/chat/completions", {**HELLO, "model": "secret-adapter"})
    missing = await call(gateway, "POST", "/v1/chat/completions", {**HELLO, "model": "missing"}, key=OTHER)
    assert hidden.status == missing.status == 404
    assert hidden.error == {**missing.error, "message": missing.error["message"].replace("missing", "secret-adapter")}
    tokenize = await call(gateway, "POST", "/tokenize", {"model": "secret-adapter", "prompt": "hi"})
    assert tokenize.status == 404 and tokenize.error["code"] == "model_not_found"
    assert (await call(gateway, "GET", "/v1/models/secret-adapter")).status == 404
    assert len(engine.bodies) == 2  # the two allowed requests (one by "other")


async def test_models_lists_only_what_the_key_may_use() -> None:
    limited = {"name": "team", "sha256": hash_key(KEY), "models": ["something-else"]}
    gateway, _, _ = build(auth={"keys": [limited, {"name": "other", "sha256": hash_key(OTHER)}]})
    assert (await call(gateway, "GET", "/v1/models")).json()["data"] == []
    assert [m["id"] for m in (await call(gateway, "GET", "/v1/models", key=OTHER)).json()["data"]] == ["fake"]


async def test_keys_listing_unserved_models_are_a_warning_not_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    gateway, _, _ = build(auth={"keys": [{"name": "team", "sha256": hash_key(KEY), "models": ["fake", "gone"]}]})
    gateway.attach(FakeEngine(), ready=lambda: True, served=lambda: frozenset({"fake"}))
    assert "key 'team' lists models nothing serves (yet): gone" in caplog.text
