"""The worst days, on servers of their own: the limits storage lost, slow and back; 500
clients at once; a replica killed with reservations held; the engine dying under load.

The fault pair starts while its Redis is down, so the tests run in this order on purpose.
No verdict bounds elapsed time: each waits for a state, then asserts it (a hang ends at the
test's timeout). The figures the old fault tier recorded are benchmarks now (docs/).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import httpx
import redis

from hermes_serve.limits import HOLD_MARGIN_S
from tests.gateway.conftest import HI, HOLD, SCRIPTED
from tests.support import fleet
from tests.support.fleet import REPLICA_REQUEST_TIMEOUT_S
from tests.support.load import crowd, one_request
from tests.support.redis import RedisServer
from tests.support.servers import Server, process_tree, wait_until
from tests.support.streams import Held

# Each token takes a while: requests still run when Redis goes, and 500 at once overflow.
PACED = {"model": SCRIPTED, "messages": [{"role": "user", "content": "Slowly. [[ms-per-token=100]]"}], "max_tokens": 32}
CROWDED = {
    "model": SCRIPTED,
    "messages": [{"role": "user", "content": "Slowly. [[ms-per-token=250]]"}],
    "max_tokens": 16,
}


def post(server: Server, key: str, body: dict[str, Any] = HI, timeout: float = 60) -> httpx.Response:
    with server.http(key) as http:
        return http.post("/v1/chat/completions", json=body, timeout=timeout)


def refused_cleanly(reply: httpx.Response, status: int, code: str) -> None:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert int(reply.headers["retry-after"]) >= 1


def test_limits_storage_down_before_start_up_then_back(
    fault_pair: tuple[Server, Server], fault_redis: RedisServer
) -> None:
    for server in fault_pair:
        refused_cleanly(post(server, "guarded"), 503, "limits_unavailable")
        assert post(server, "tester").status_code == 200, "keys without limits do not need the storage"
        assert server.metric("hermes_limits_storage_up") == 0
    fault_redis.start()  # no restart of ours: the next requests find it
    for server in fault_pair:
        assert wait_until(lambda s=server: post(s, "guarded").status_code == 200, 30)
        assert server.metric("hermes_limits_storage_up") == 1


def stalled(redis_server: RedisServer) -> bool:
    """Redis does not answer a PING within 0.2 s."""
    probe = redis.Redis.from_url(redis_server.url, socket_timeout=0.2, socket_connect_timeout=0.2)
    try:
        probe.ping()
        return False
    except redis.RedisError:
        return True
    finally:
        probe.close()


def test_limits_storage_lost_under_load_and_slow(fault_pair: tuple[Server, Server], fault_redis: RedisServer) -> None:
    server = fault_pair[0]

    async def load_while_redis_stops() -> list[Any]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            secret = server.keys["guarded"]
            jobs = [
                asyncio.create_task(one_request(http, "guarded", secret, {**PACED, "stream": i % 2 == 0}))
                for i in range(40)
            ]
            # Redis goes while requests run: their settlements wait for it to come back.
            while server.metric("hermes_running_requests") < 10:
                await asyncio.sleep(0.05)
            fault_redis.stop()
            return list(await asyncio.gather(*jobs))

    outcomes = asyncio.run(load_while_redis_stops())
    statuses = sorted({o.status for o in outcomes})
    assert all(o.complete for o in outcomes), [o for o in outcomes if not o.complete]
    assert set(statuses) <= {200, 503}, statuses
    refused_cleanly(post(server, "guarded"), 503, "limits_unavailable")
    fault_redis.start()
    assert wait_until(lambda: post(server, "guarded").status_code == 200, 30)

    # Slower than the gateway's 2 s timeout: refused while Redis still sleeps, never hung on it.
    stall = threading.Thread(target=fault_redis.command, args=("DEBUG", "SLEEP", "10"))
    stall.start()
    assert wait_until(lambda: stalled(fault_redis), 5)
    refused_cleanly(post(server, "guarded"), 503, "limits_unavailable")
    assert stall.is_alive(), "answered before Redis did: the gateway did not wait for it"
    stall.join()
    assert wait_until(lambda: post(server, "guarded").status_code == 200, 30)


def test_five_hundred_clients_at_once(fault_pair: tuple[Server, Server], record_property: Any) -> None:
    server = fault_pair[0]
    keys = [f"crowd-{i}" for i in range(1, 6)]
    tally = asyncio.run(crowd(server, keys, 500, CROWDED))
    by_status, ok_by_key = tally.by_status(), tally.ok_by_key()
    record_property("five_hundred_clients", {"by_status": by_status, "200s_by_key": ok_by_key})
    print(f"500 clients: {by_status}, 200s by key {ok_by_key}")
    assert sum(by_status.values()) == 500, "every request answered or refused: none lost"
    assert not tally.broken(), tally.broken()[:5]
    assert set(by_status) <= {200, 429, 503, 504} and by_status.get(503, 0) > 0
    mean = sum(ok_by_key.values()) / len(keys)
    assert len(ok_by_key) == 5 and all(abs(n - mean) <= 0.2 * mean for n in ok_by_key.values()), ok_by_key
    assert wait_until(server.idle, 60)
    assert post(server, "tester").status_code == 200, "served as before once the crowd is gone"


def held_reservations(key: str) -> list[float]:
    """When each of ``key``'s reservations frees itself (wall clock), read from the replicas'
    shared Redis."""
    store = redis.Redis.from_url(fleet.fleet().redises["main"].url)
    try:
        return [score for _, score in store.zrange(f"hermes:{{{key}}}:held", 0, -1, withscores=True)]
    finally:
        store.close()


def test_a_replica_killed_mid_request(replicas: tuple[Server, Server]) -> None:
    """Its reservations free themselves within request_timeout_s; the survivor's charges are exact."""
    survivor, victim = replicas
    held = {**HOLD, "max_tokens": 600}  # ~610 tokens held each
    holders = [Held(victim, held, key="held") for _ in range(3)]

    def reserved() -> int:
        with survivor.http("held") as http:
            return int(http.get("/v1/usage").json()["limits"]["tokens_per_minute"]["reserved"])

    assert wait_until(lambda: reserved() >= 1800, 30)
    for process in process_tree(victim):  # SIGKILL, every process: no shutdown hook runs
        process.kill()
    killed = time.time()
    big = {**HI, "max_tokens": 880}
    assert post(survivor, "held", big).status_code == 429, "the dead replica's reservations still count"
    # Each frees itself request_timeout_s + HOLD_MARGIN_S after it was made, before the kill.
    frees_at = held_reservations("held")
    assert len(frees_at) == 3 and all(t <= killed + REPLICA_REQUEST_TIMEOUT_S + HOLD_MARGIN_S for t in frees_at)
    charged_before = survivor.metric("hermes_tokens_total", key="held")
    assert wait_until(lambda: reserved() == 0, 60)
    reply = post(survivor, "held", big)
    assert reply.status_code == 200, reply.text
    used = reply.json()["usage"]["total_tokens"]
    assert wait_until(lambda: survivor.metric("hermes_tokens_total", key="held") - charged_before == used)
    assert reserved() == 0
    for holder in holders:
        holder.leave()


def test_the_engine_dies_under_load_and_comes_back(mortal: Server) -> None:
    """Streams in flight end with the API's error event, requests meanwhile are refused at once
    (503), and the engine is started again in the same process. Its start gate is closed while
    the test looks at the dead engine, so nothing here races its restart."""
    assert mortal.gates is not None
    (mortal.gates / "engine-start").unlink()
    streams = [Held(mortal, HOLD) for _ in range(10)]
    for stream in streams:
        stream.event()  # all ten are past their first token
    died = {**HI, "messages": [{"role": "user", "content": "Now. [[die]]"}]}
    refused_cleanly(post(mortal, "tester", died), 503, "model_not_ready")
    for stream in streams:
        events = [line for line in stream.rest() if line.startswith("data: ")]
        error, done = events[-2:]
        assert json.loads(error.removeprefix("data: "))["error"]["code"] == "engine_failed" and done == "data: [DONE]"
        stream.leave()
    with mortal.http(key=None) as probe:
        assert wait_until(lambda: probe.get("/readyz").status_code == 503)
        for _ in range(3):  # answered, not hung, while the engine is down
            refused_cleanly(post(mortal, "tester"), 503, "model_not_ready")
            assert probe.get("/livez").status_code == 200, "the process stays; only the engine restarts"
        (mortal.gates / "engine-start").touch()
        assert wait_until(lambda: probe.get("/readyz").status_code == 200, 60)
    assert post(mortal, "tester").status_code == 200
    assert mortal.metric("hermes_engine_restarts_total") == 1
