"""Real `bentoml serve` processes with the real engine and weights, shared by the session.

Two servers read one configuration file and share one private Redis, as two replicas would:
keys with small limits, a concurrency of 1 with a queue of 1 and short timeouts (so overload
and timeouts can be provoked on the first). The second proves limits and key changes are
shared, and is also the isolation server: it serves the file's two tiny LoRA adapters (the
first is told to serve none), and its environment adds a deliberately small KV cache, room
for a flood of requests in its engine, and longer timeouts (the priority experiment).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support import servers
from tests.support.lora import RANK, write_adapter
from tests.support.redis import RedisServer
from tests.support.servers import Server

READY_TIMEOUT_S = float(os.environ.get("HERMES_TEST_READY_TIMEOUT", "900"))
# Long enough that a busy 2-core machine surely sends the third request while the second
# still waits.
QUEUE_TIMEOUT_S = 10
REQUEST_TIMEOUT_S = 25
SERVED_NAME = "smollm2-135m-instruct"

KEY_LIMITS = {
    "tester": {},
    "limited": {"requests_per_minute": 3},
    "shared": {"requests_per_minute": 3},
    "thrifty": {"tokens_per_minute": 300},
    "meter": {"tokens_per_minute": 1_000_000},  # test_accounting's alone: its charges are exact
    "daily": {"tokens_per_day": 200},  # test_keys's shared day budget
    "cache-a": {},  # test_isolation's prefix-cache keys
    "cache-b": {},
    "batch": {"priority": -5},  # the priority experiment: a flood, and who gets ahead of it
    "peer": {"priority": -5},
    "interactive": {"priority": 5},
    "base-only": {"models": [SERVED_NAME]},
    "fuzz": {"tokens_per_minute": 300},  # test_contract's: big generations refused before the engine
    "console": {"tokens_per_day": 1_000_000},  # test_console's: its standing shows a budget
}
ADAPTERS = {"tiny-zero": 0.0, "tiny-random": 1.0}  # name: scale of the adapter's B matrices
# About 1 200 tokens of SmolLM2-135M (vLLM wants room for one whole context, 1 024 here): a
# few long generations fill it.
ISOLATED_CONTEXT = 1024
KV_CACHE_BYTES = 28 * 2**20
RELOAD_INTERVAL_S = 1


def _section(keys: dict[str, str], redis_url: str, adapters: list[dict[str, str]]) -> dict[str, object]:
    return {
        "device": "cpu",
        "model": {
            "served_name": SERVED_NAME,
            "max_model_len": 2048,
            "cpu_kvcache_space_gib": 1,
            "adapters": adapters,
            "max_lora_rank": RANK,
        },
        "auth": {
            "reload_interval_s": RELOAD_INTERVAL_S,
            "keys": [
                {"name": name, "sha256": hashlib.sha256(keys[name].encode()).hexdigest(), **limits}
                for name, limits in KEY_LIMITS.items()
            ],
        },
        "admission": {
            "max_concurrency": 1,
            "max_queue": 1,
            "queue_timeout_s": QUEUE_TIMEOUT_S,
            "request_timeout_s": REQUEST_TIMEOUT_S,
        },
        "limits_storage": redis_url,
        "server": {"max_body_bytes": 65536},
    }


@pytest.fixture(scope="session")
def servers_pair(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, embedded_model_dir: Path
) -> Iterator[tuple[Server, Server]]:
    workdir = tmp_path_factory.mktemp("e2e")
    keys = {name: "hs-test-" + secrets.token_urlsafe(16) for name in KEY_LIMITS}
    adapters = [
        {"name": name, "source": str(write_adapter(embedded_model_dir, workdir / "adapters" / name, scale))}
        for name, scale in ADAPTERS.items()
    ]
    config = workdir / "configuration.yaml"
    servers.write_config(config, _section(keys, redis_url, adapters))
    models = embedded_model_dir.parents[1]  # the user's store, shared by both servers' homes
    first = {"HERMES_MODEL__ADAPTERS": "[]"}  # LoRA stays off (it turns torch.compile off on CPU)
    isolation = {
        "HERMES_MODEL__CPU_KVCACHE_SPACE_GIB": "null",
        "HERMES_MODEL__MAX_MODEL_LEN": str(ISOLATED_CONTEXT),
        "HERMES_MODEL__ENGINE_ARGS": json.dumps(["--kv-cache-memory-bytes", str(KV_CACHE_BYTES)]),
        "HERMES_ADMISSION__MAX_CONCURRENCY": "40",
        "HERMES_ADMISSION__MAX_QUEUE": "40",
        "HERMES_ADMISSION__REQUEST_TIMEOUT_S": "120",
    }
    started = [
        servers.start(
            config,
            workdir / f"server-{i}",
            keys,
            models=models,
            cpus=servers.cpu_share(i, 2),
            environment=isolation if i == 1 else first,
        )
        for i in range(2)
    ]
    with servers.serving(started, READY_TIMEOUT_S):
        yield started[0], started[1]


@pytest.fixture(scope="session")
def server(servers_pair: tuple[Server, Server]) -> Server:
    return servers_pair[0]


@pytest.fixture(scope="session")
def isolated(servers_pair: tuple[Server, Server]) -> Server:
    """The second server: adapters, a small KV cache, a flood's room (see the module's doc)."""
    return servers_pair[1]


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return server.client()


@pytest.fixture
def slot_free(server: Server) -> None:
    """For tests that take the first server's one engine slot: nothing of an earlier test's
    is still running or queued there."""
    assert servers.wait_until(server.idle, 60), "an earlier test's request still holds the slot"


# --- the fault tier: two more servers, over a Redis of their own that starts out down ----------

FAULT_REQUEST_TIMEOUT_S = 20
APP_ORIGIN = "https://app.example.com"
FAULT_KEYS = {
    "tester": {},
    "guarded": {"requests_per_minute": 100_000},  # any limit: its requests need the storage
    "held": {"tokens_per_minute": 2_000},  # the replica-kill test's reservations
    **{f"crowd-{i}": {} for i in range(1, 6)},
    "soak": {},
    "soak-limited": {"requests_per_minute": 5},  # refused (429) from the soak's warm-up on
}


@pytest.fixture(scope="session")
def fault_redis(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[RedisServer]:
    """Not started: the fault servers start while their limits storage is down."""
    server = RedisServer(redis_server.binary, tmp_path_factory.mktemp("fault-redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fault_pair(
    tmp_path_factory: pytest.TempPathFactory, fault_redis: RedisServer, embedded_model_dir: Path
) -> Iterator[tuple[Server, Server]]:
    workdir = tmp_path_factory.mktemp("faults")
    keys = {name: "hs-fault-" + secrets.token_urlsafe(16) for name in FAULT_KEYS}
    section = {
        "device": "cpu",
        "model": {"served_name": SERVED_NAME, "max_model_len": 2048, "cpu_kvcache_space_gib": 1},
        "auth": {
            "keys": [
                {"name": name, "sha256": hashlib.sha256(keys[name].encode()).hexdigest(), **limits}
                for name, limits in FAULT_KEYS.items()
            ]
        },
        "admission": {
            "max_concurrency": 64,
            "max_queue": 50,
            "queue_timeout_s": FAULT_REQUEST_TIMEOUT_S,
            "request_timeout_s": FAULT_REQUEST_TIMEOUT_S,
        },
        "limits_storage": fault_redis.url,
        "server": {"cors_origins": [APP_ORIGIN]},
    }
    config = workdir / "configuration.yaml"
    servers.write_config(config, section)
    models = embedded_model_dir.parents[1]
    started = [
        servers.start(config, workdir / f"fault-{i}", keys, models=models, cpus=servers.cpu_share(i, 2))
        for i in range(2)
    ]
    with servers.serving(started, READY_TIMEOUT_S):
        yield started[0], started[1]
