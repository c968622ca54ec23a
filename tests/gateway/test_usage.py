"""The usage ledger in real servers: SQLite by default (memory:// limits), and two replicas
writing one real Postgres over one Redis. Rows match what each API reported; budgets survive a
restart, a crash and a flushed Redis; the store stopped under load loses nothing; a replica
killed outright loses no row that ended a second before; keys see only their own usage."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis
from openai.types.admin.organization.usage_completions_response import UsageCompletionsResponse

from tests.support import fleet, servers
from tests.support.servers import Server, wait_until
from tests.support.usage import END_USERS, PATHS, arrived, body, reported, store_of

SCRIPTED = fleet.SCRIPTED


def fresh(name: str) -> Server:
    """A fleet server as it is now (a test may have restarted it)."""
    return fleet.fleet().gateway[name]


def restarted(name: str, kill: bool = False) -> Server:
    again = servers.restart(fleet.fleet().gateway[name], kill=kill)
    fleet.fleet().gateway[name] = again
    servers.wait_ready(again, time.monotonic() + 120)
    return again


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_each_apis_row_holds_what_the_api_reported(kept: Server, stream: bool) -> None:
    sent = {}
    with fresh("kept").http() as http:
        for api, path in PATHS.items():
            headers = {"anthropic-version": "2023-06-01", "x-client-request-id": f"mine-{api}-{stream}"}
            answer = http.post(path, json=body(api, stream), headers=headers)
            assert answer.status_code == 200, answer.text
            sent[answer.headers["x-request-id"]] = (api, reported(api, answer, stream))
    store = store_of(fresh("kept"))
    found = arrived(store, list(sent))
    for request_id, (api, (input_tokens, cached, output)) in sent.items():
        row = found[request_id]
        assert (row.input_tokens, row.cached_input_tokens, row.output_tokens) == (input_tokens, cached, output), api
        assert cached == 3 and output == 6  # the scripted engine did as told: the numbers are real ones
        assert (row.api, row.model, row.key, row.status, row.outcome) == (api, SCRIPTED, "tester", 200, "ok")
        assert row.client_request_id == f"mine-{api}-{stream}"
        assert row.end_user == END_USERS[api]
        assert row.admitted and row.ended >= row.started
    store.close()


def test_refusals_are_rows_too_and_no_row_holds_a_prompt_or_a_key(kept: Server) -> None:
    server = fresh("kept")
    with server.http() as http, server.http(key=None) as anonymous:
        bad = http.post("/v1/chat/completions", json={"model": SCRIPTED, "messages": "no"})
        missing = http.post("/v1/chat/completions", json={**body("chat", False), "model": "nope"})
        unknown = anonymous.post("/v1/chat/completions", json=body("chat", False))
    assert (bad.status_code, missing.status_code, unknown.status_code) == (400, 404, 401)
    ids = [r.headers["x-request-id"] for r in (bad, missing, unknown)]
    store = store_of(server)
    found = arrived(store, ids)
    assert [(found[i].status, found[i].key, found[i].admitted) for i in ids] == [
        (400, "tester", False),
        (404, "tester", True),  # the engine's own 404, after the key's limits let it in
        (401, "unknown", False),
    ]
    everything = store.query("SELECT * FROM usage_requests")
    store.close()
    text = json.dumps(everything)
    assert "apples" not in text and server.keys["tester"] not in text


def spend(server: Server, key: str, times: int) -> int:
    """Tokens charged for ``times`` requests, as the API reported them."""
    charged = 0
    with server.http(key=key) as http:
        for _ in range(times):
            answer = http.post("/v1/chat/completions", json=body("chat", False))
            assert answer.status_code == 200, answer.text
            charged += answer.json()["usage"]["total_tokens"]
    return charged


def day_used(server: Server, key: str) -> tuple[int, int]:
    with server.http(key=key) as http:
        limits = http.get("/v1/usage").json()["limits"]
    return limits["tokens_per_day"]["used"], limits["requests_per_day"]["used"]


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
def test_a_restart_gives_no_key_its_day_budget_back(kept: Server, kill: bool) -> None:
    server = fresh("kept")
    before_tokens, before_requests = day_used(server, "daily")
    charged = spend(server, "daily", 3)
    assert day_used(server, "daily") == (before_tokens + charged, before_requests + 3)
    if kill:  # a crash: only what reached the ledger a second before counts
        store = store_of(server)
        with server.http(key="daily") as http:
            last = http.get("/v1/usage").headers["x-request-id"]
        arrived(store, [last])
        store.close()
    server = restarted("kept", kill=kill)
    assert day_used(server, "daily") == (before_tokens + charged, before_requests + 3)


def test_a_flushed_redis_gives_no_key_its_day_budget_back(ledger_pair: tuple[Server, Server]) -> None:
    first, second = fresh("ledger-0"), fresh("ledger-1")
    charged = spend(first, "daily", 2) + spend(second, "daily", 2)
    used = day_used(first, "daily")
    assert used[0] >= charged and used[1] >= 4
    store = store_of(first)
    with first.http(key="daily") as http:
        arrived(store, [http.get("/v1/usage").headers["x-request-id"]])
    store.close()
    redis.Redis.from_url(fleet.fleet().redises["ledger"].url).flushall()
    # Until a replica notices (it checks every few seconds) the count may read 0; then it is back.
    assert wait_until(lambda: day_used(first, "daily") == used, timeout=60), day_used(first, "daily")
    assert day_used(second, "daily") == used


def org_usage(server: Server, key: str, **params: Any) -> httpx.Response:
    with server.http(key=key) as http:
        return http.get("/v1/organization/usage/completions", params=params)


def test_two_replicas_write_one_postgres_and_the_usage_api_sums_both(ledger_pair: tuple[Server, Server]) -> None:
    first, second = fresh("ledger-0"), fresh("ledger-1")
    start = int(time.time()) - 60
    totals = {"input": 0, "output": 0}
    ids = []
    for server, times in ((first, 3), (second, 2)):
        with server.http(key="summed") as http:
            for _ in range(times):
                answer = http.post("/v1/chat/completions", json=body("chat", False))
                assert answer.status_code == 200
                ids.append(answer.headers["x-request-id"])
                totals["input"] += answer.json()["usage"]["prompt_tokens"]
                totals["output"] += answer.json()["usage"]["completion_tokens"]
    store = store_of(first)
    arrived(store, ids)
    store.close()
    page = org_usage(second, "admin", start_time=start, bucket_width="1d", group_by=["api_key_id", "model"])
    assert page.status_code == 200, page.text
    parsed = UsageCompletionsResponse.model_validate(page.json())  # OpenAI's own type for this answer
    results = [r for bucket in parsed.data for r in bucket.results if r.api_key_id == "summed"]
    assert [(r.model, r.num_model_requests, r.input_tokens, r.output_tokens) for r in results] == [
        (SCRIPTED, 5, totals["input"], totals["output"])
    ]


def test_a_key_that_is_not_admin_sees_only_itself(ledger_pair: tuple[Server, Server]) -> None:
    first = fresh("ledger-0")
    spend(first, "other", 1)
    spend(first, "tester", 1)
    start = int(time.time()) - 60
    assert org_usage(first, "other", start_time=start, api_key_ids=["tester"]).status_code == 403
    assert org_usage(first, "other", start_time=start, api_key_ids=["tester"]).json()["error"]["code"] == (
        "insufficient_permissions"
    )

    def keys_seen(key: str) -> set[str]:
        page = org_usage(first, key, start_time=start, group_by=["api_key_id"]).json()
        return {r["api_key_id"] for bucket in page["data"] for r in bucket["results"]}

    assert wait_until(lambda: {"other", "tester"} <= keys_seen("admin"))
    assert keys_seen("other") == {"other"}
    with first.http(key="other") as http:
        own = http.get("/v1/usage").json()
    assert own["limits"] == {} and own["usage"]["today"]["requests"] >= 1  # a key with no limits sees its use
    bad = org_usage(first, "admin", start_time=start, bucket_width="1w")
    assert (bad.status_code, bad.json()["error"]["param"]) == (400, "bucket_width")


def test_the_store_stopped_under_load_loses_no_request_and_no_row(ledger_pair: tuple[Server, Server]) -> None:
    first, second = fresh("ledger-0"), fresh("ledger-1")
    postgres = fleet.fleet().postgres
    assert postgres is not None
    ids: list[str] = []
    lock = threading.Lock()

    def one(server: Server) -> int:
        with server.http() as http:
            answer = http.post("/v1/chat/completions", json=body("chat", False))
        with lock:
            ids.append(answer.headers["x-request-id"])
        return answer.status_code

    postgres.stop()
    try:
        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(one, [first, second] * 40))
        assert statuses == [200] * 80  # requests never wait on the store
        assert wait_until(lambda: first.metric("hermes_usage_write_failures_total") > 0)
        assert first.metric("hermes_usage_queue_rows") > 0  # they wait, spilled
    finally:
        postgres.start()
    store = store_of(first)
    arrived(store, ids)
    store.close()
    assert wait_until(lambda: first.metric("hermes_usage_queue_rows") == 0)
    assert wait_until(lambda: second.metric("hermes_usage_queue_rows") == 0)


def test_a_replica_killed_outright_loses_no_row_older_than_a_second(ledger_pair: tuple[Server, Server]) -> None:
    victim = fresh("ledger-1")
    postgres = fleet.fleet().postgres
    assert postgres is not None
    ids = []
    postgres.stop()  # the harder case: nothing can be committed, rows must be on the replica's disk
    try:
        with victim.http() as http:
            for _ in range(10):
                answer = http.post("/v1/chat/completions", json=body("chat", False))
                assert answer.status_code == 200
                ids.append(answer.headers["x-request-id"])
        time.sleep(1.0)  # the precondition: every one of them ended a second before the kill
        victim = restarted("ledger-1", kill=True)
    finally:
        postgres.start()
    store = store_of(victim)
    arrived(store, ids)
    store.close()
