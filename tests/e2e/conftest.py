"""Real `bentoml serve` processes with the real engine and weights, shared by the session.

One configuration serves every e2e test: a concurrency of 1 with a queue of 1 and short
timeouts (so overload and timeouts can be provoked), keys with small limits, and limits kept
in a private Redis. A second process over the same Redis proves the limits are shared.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support import servers
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
}
RELOAD_INTERVAL_S = 1


def _section(keys: dict[str, str], redis_url: str) -> dict[str, object]:
    return {
        "device": "cpu",
        "model": {"served_name": SERVED_NAME, "max_model_len": 2048, "cpu_kvcache_space_gib": 1},
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
    config = workdir / "configuration.yaml"
    servers.write_config(config, _section(keys, redis_url))
    models = embedded_model_dir.parents[1]  # the user's store, shared by both servers' homes
    started = [
        servers.start(config, workdir / f"server-{i}", keys, models=models, cpus=servers.cpu_share(i, 2))
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        for server in started:
            try:
                servers.wait_ready(server, deadline)
            except servers.NotReady as exc:
                pytest.fail(str(exc))
        yield started[0], started[1]
    finally:
        left_behind = [(server.log_tail(), pids) for server in started if (pids := servers.stop(server))]
        assert not left_behind, f"left behind after SIGTERM: {left_behind}"


@pytest.fixture(scope="session")
def server(servers_pair: tuple[Server, Server]) -> Server:
    return servers_pair[0]


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return server.client()
