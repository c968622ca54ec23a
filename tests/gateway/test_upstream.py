"""The gateway over HTTP engines (``model.upstream``): one server straight over a scripted
engine served alone, and two replicas in front of vLLM's own router (``vllm-router``,
``consistent_hash``) over two scripted engines. Each engine records every request it received."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import pytest

from tests.support import fleet
from tests.support.fleet import Helper
from tests.support.servers import Server, wait_until
from tests.support.usage import PATHS, SCRIPTED, arrived, body, reported, store_of

HOLD = "Wait for me. [[hold]]"


def helper(name: str) -> Helper:
    return fleet.fleet().helpers[name]


@pytest.fixture
def direct(gateway_servers: dict[str, Server]) -> Server:
    """One gateway straight over ``engine-solo``, with a 2 s read limit toward it."""
    return gateway_servers["direct"]


@pytest.fixture
def relay(gateway_servers: dict[str, Server]) -> tuple[Server, Server]:
    """Two replicas (one Redis, one Postgres ledger, one tenant secret) in front of the router."""
    return gateway_servers["relay-0"], gateway_servers["relay-1"]


def ask(server: Server, key: str, content: str = "Say hi.", **extra: Any) -> httpx.Response:
    with server.http(key=key) as http:
        message = {"model": SCRIPTED, "messages": [{"role": "user", "content": content}], "max_tokens": 8}
        return http.post("/v1/chat/completions", json={**message, **extra})


def received_by(engine: Helper, request_ids: set[str]) -> list[dict[str, Any]]:
    return [r for r in engine.received() if dict(r["headers"]).get("x-request-id") in request_ids]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_every_api_is_relayed_and_metered_from_the_upstreams_usage(direct: Server, stream: bool) -> None:
    sent = {}
    with direct.http() as http:
        for api, path in PATHS.items():
            answer = http.post(
                path, json={**body(api, stream), "cache_salt": "mine"}, headers={"anthropic-version": "1"}
            )
            assert answer.status_code == 200, answer.text
            if stream:
                assert answer.headers["content-type"].startswith("text/event-stream")
            sent[answer.headers["x-request-id"]] = (api, reported(api, answer, stream))
    store = store_of(direct)
    rows = arrived(store, list(sent))
    store.close()
    for request_id, (api, usage) in sent.items():
        row = rows[request_id]
        assert (row.input_tokens, row.cached_input_tokens, row.output_tokens) == usage, api
    engine_saw = received_by(helper("engine-solo"), set(sent))
    assert len(engine_saw) == len(sent)
    for request in engine_saw:
        engine_body = json.loads(request["body"])
        assert len(engine_body["cache_salt"]) == 64 and engine_body["cache_salt"] != "mine"  # the gateway's salt
        assert dict(request["headers"])["x-tenant-id"] != ""


def test_the_clients_key_never_reaches_the_upstream(direct: Server, relay: tuple[Server, Server]) -> None:
    ids = set()
    for server in (direct, *relay):
        with server.http() as http:
            headers = {"x-api-key": server.keys["tester"], "x-tenant-id": "someone-else", "x-user-id": "u"}
            for path in ("/v1/chat/completions", "/v1/models"):
                answer = (
                    http.post(path, json=body("chat", False), headers=headers)
                    if path.endswith("completions")
                    else http.get(path, headers=headers)
                )
                assert answer.status_code == 200, answer.text
                ids.add(answer.headers["x-request-id"])
    received = [r for name in ("engine-solo", "engine-a", "engine-b") for r in helper(name).received()]
    assert len([r for r in received if dict(r["headers"]).get("x-request-id") in ids]) == len(ids)
    keys = [server.keys[name] for server in (direct, *relay) for name in server.keys]
    everything = json.dumps(received)
    assert not [key for key in keys if key in everything], "a client's key reached an engine"
    for request in received:
        headers = dict(request["headers"])
        assert (
            headers.get("x-tenant-id") != "someone-else" and "x-user-id" not in headers and "x-api-key" not in headers
        )
        # The relay's own credential, or none at all: never a client's.
        assert headers.get("authorization") in (None, "Bearer upstream-credential")


def test_a_client_that_leaves_aborts_the_upstream_request(direct: Server) -> None:
    engine = helper("engine-solo")
    with direct.http() as http:
        request = {**body("chat", True), "messages": [{"role": "user", "content": HOLD}]}
        with http.stream("POST", "/v1/chat/completions", json=request) as answer:
            assert answer.status_code == 200
            chunks = answer.iter_raw()  # kept: a generator let go closes the response
            next(chunks)  # its first token: the engine is running it
            assert wait_until(lambda: engine.metric("vllm:num_requests_running") == 1)
    # The client is gone: vLLM's own gauge on the engine says the request was aborted there.
    assert wait_until(lambda: engine.metric("vllm:num_requests_running") == 0)


def test_a_silent_upstream_is_a_502_or_an_error_event_never_a_hang(direct: Server) -> None:
    held = {**body("chat", False), "messages": [{"role": "user", "content": HOLD}]}
    with direct.http() as http:
        answer = http.post("/v1/chat/completions", json=held)
        assert answer.status_code == 502 and answer.headers["retry-after"] == "5"
        assert answer.json()["error"]["code"] == "upstream_error"
        streamed = http.post("/v1/chat/completions", json={**held, "stream": True})
    assert streamed.status_code == 200
    events = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[-2][6:])["error"]["code"] == "engine_failed" and events[-1] == "data: [DONE]"


def test_an_upstream_that_is_down_is_a_clean_503_and_readiness_follows_it(direct: Server) -> None:
    engine = helper("engine-solo")
    engine.stop()
    try:
        answer = ask(direct, "tester")
        assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
        assert answer.json()["error"]["code"] in ("upstream_unavailable", "model_not_ready")
        assert wait_until(lambda: httpx.get(f"{direct.url}/readyz", timeout=10).status_code == 503)
    finally:
        engine.start()
    assert wait_until(lambda: httpx.get(f"{direct.url}/readyz", timeout=10).status_code == 200)
    assert ask(direct, "tester").status_code == 200


def engines_of(keys: dict[str, set[str]]) -> dict[str, set[str]]:
    """For each key, the engines that received its requests (``keys``: its request ids)."""
    found: dict[str, set[str]] = {}
    for name in ("engine-a", "engine-b"):
        for request in helper(name).received():
            request_id = dict(request["headers"]).get("x-request-id")
            for key, ids in keys.items():
                if request_id in ids:
                    found.setdefault(key, set()).add(name)
    return found


def test_each_key_stays_on_one_engine_and_the_keys_spread_over_both(relay: tuple[Server, Server]) -> None:
    ids: dict[str, set[str]] = {}
    for i in range(8):
        key = f"tenant-{i}"
        for server in (*relay, *relay):  # through both replicas
            answer = ask(server, key)
            assert answer.status_code == 200, answer.text
            ids.setdefault(key, set()).add(answer.headers["x-request-id"])
    found = engines_of(ids)
    assert all(len(engines) == 1 for engines in found.values()), found
    assert set().union(*found.values()) == {"engine-a", "engine-b"}, found


def test_a_keys_second_request_finds_the_prefix_it_left_there(relay: tuple[Server, Server]) -> None:
    prompt = "A long shared preamble about rivers and lakes, " * 8
    first = ask(relay[0], "tenant-1", prompt)
    again = ask(relay[1], "tenant-1", prompt)  # the other replica: the same tenant, the same salt
    other = ask(relay[0], "tenant-2", prompt)
    cached = [r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] for r in (first, again, other)]
    assert cached[0] == 0 and cached[1] > 0 and cached[2] == 0, cached


def test_two_replicas_hold_one_day_budget(relay: tuple[Server, Server]) -> None:
    charged = 0
    for server in relay:
        answer = ask(server, "daily")
        assert answer.status_code == 200
        charged += answer.json()["usage"]["total_tokens"]
    seen = []
    for server in relay:
        with server.http(key="daily") as http:
            seen.append(http.get("/v1/usage").json()["limits"]["tokens_per_day"]["used"])
    assert seen[0] == seen[1] >= charged


def test_an_engine_killed_mid_load_ends_its_streams_cleanly_and_the_survivor_serves(
    relay: tuple[Server, Server],
) -> None:
    victim, survivor = helper("engine-a"), helper("engine-b")
    streams: dict[str, dict[str, Any]] = {}

    def hold(key: str, server: Server) -> None:
        with server.http(key=key) as http:
            request = {**body("chat", True), "messages": [{"role": "user", "content": "[[gate=kill-test]]"}]}
            with http.stream("POST", "/v1/chat/completions", json=request) as answer:
                text = b""
                streams[key] = {"id": answer.headers["x-request-id"], "status": answer.status_code}
                for chunk in answer.iter_raw():  # to its end: leaving at [DONE] would race the gateway
                    text += chunk
                streams[key]["text"] = text.decode()

    keys = [f"tenant-{i}" for i in range(8)]
    threads = [threading.Thread(target=hold, args=(key, relay[i % 2]), daemon=True) for i, key in enumerate(keys)]
    for thread in threads:
        thread.start()
    assert wait_until(
        lambda: victim.metric("vllm:num_requests_running") + survivor.metric("vllm:num_requests_running") == 8
    )
    on_victim = {
        key for key, engines in engines_of({k: {streams[k]["id"]} for k in keys}).items() if "engine-a" in engines
    }
    assert on_victim and on_victim != set(keys)
    victim.stop(kill=True)
    try:
        for key in on_victim:  # their streams end with the API's error event, not a cut connection
            assert wait_until(lambda key=key: "text" in streams[key])
            events = [line for line in streams[key]["text"].splitlines() if line.startswith("data: ")]
            assert json.loads(events[-2][6:])["error"]["code"] == "engine_failed", key
            assert events[-1] == "data: [DONE]"
        # New requests of those keys go to the survivor once the router has seen the death.
        moved = sorted(on_victim)[0]
        assert wait_until(lambda: ask(relay[0], moved).status_code == 200, timeout=60)
    finally:
        victim.start()
    # Nothing charged twice: each request one row in the ledger, the cut ones too.
    for name in ("engine-a", "engine-b"):  # the survivor's streams go on to their end
        (fleet.fleet().workdir / name / "gates" / "kill-test").touch()
    for thread in threads:
        thread.join(timeout=60)
    assert all(streams[k]["text"].rstrip().endswith("data: [DONE]") for k in keys)
    store = store_of(relay[0])
    rows = arrived(store, [streams[k]["id"] for k in keys])
    store.close()
    assert {rows[streams[k]["id"]].outcome for k in on_victim} == {"engine_failed"}
    assert {rows[streams[k]["id"]].outcome for k in set(keys) - on_victim} == {"ok"}
