"""Real `bentoml serve` processes with the real engine and weights, shared by the session.

One configuration serves every e2e test: a concurrency of 1 with a queue of 1 and short
timeouts (so overload and timeouts can be provoked), keys with small limits, and limits kept
in a private Redis. A second process over the same Redis proves the limits are shared.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import yaml

from tests.conftest import REPO, free_port

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
}


@dataclass
class Server:
    url: str
    keys: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes]

    def client(self, key: str = "tester", **options: object) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=self.keys[key], max_retries=0, **options  # type: ignore[arg-type]
        )

    def http(self, key: str | None = "tester") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[key]}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def metric(self, name: str) -> float:
        """Sum of a Prometheus series from /metrics (all label sets)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name)] in " {":
                total += float(line.rsplit(" ", 1)[1])
        return total

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _write_config(path: Path, keys: dict[str, str], redis_url: str) -> None:
    config = {
        "services": {
            "hermes": {
                "traffic": {"timeout": 3600},
                "device": "cpu",
                "model": {"served_name": SERVED_NAME, "max_model_len": 2048, "cpu_kvcache_space_gib": 1},
                "auth": {
                    "keys": [
                        {"name": name, "sha256": hashlib.sha256(keys[name].encode()).hexdigest(), **limits}
                        for name, limits in KEY_LIMITS.items()
                    ]
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
        }
    }
    path.write_text(yaml.safe_dump(config))


def _cpu_share(index: int, shares: int) -> str:
    """This process's CPUs split into ``shares`` disjoint sets, as vLLM's CPU bind list ("0,1").

    vLLM's automatic binding pins every engine on a host to the same cores; two test servers
    would then compile and run on one core while the other idles.
    """
    cpus = sorted(os.sched_getaffinity(0))
    size = max(1, len(cpus) // shares)
    mine = cpus[index * size : (index + 1) * size] or cpus[-size:]
    return ",".join(map(str, mine))


def _start(config: Path, workdir: Path, keys: dict[str, str], models: Path, cpus: str) -> Server:
    """``bentoml serve`` with a BentoML home of its own, sharing the model store.

    ``bentoml serve`` empties ``$BENTOML_HOME/prometheus_multiproc_dir`` when it starts, and
    every server of one home writes its metrics there: two servers of one home would wipe and
    then sum each other's ``/metrics``, which these tests read.
    """
    port = free_port()
    home = workdir / "bentoml"
    home.mkdir(parents=True)
    (home / "models").symlink_to(models)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_")}
    env.update(
        HERMES_CONFIG=str(config), BENTOML_CONFIG=str(config), BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="true",
        VLLM_CPU_OMP_THREADS_BIND=cpus,
    )  # fmt: skip
    bentoml = Path(sys.executable).with_name("bentoml")
    log = workdir / "server.log"
    process = subprocess.Popen(
        [str(bentoml), "serve", "service:HermesService", "--port", str(port), "--host", "127.0.0.1"],
        cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    return Server(f"http://127.0.0.1:{port}", keys, log, process)


def _wait_ready(server: Server, deadline: float) -> None:
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"server not ready after {READY_TIMEOUT_S:.0f}s:\n{server.log_tail()}")


def _stop(server: Server) -> None:
    """SIGTERM as an operator would; every process of the tree (engine included) must exit."""
    tree = [psutil.Process(server.process.pid)]
    tree += tree[0].children(recursive=True)
    server.process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=60)
    for process in alive:
        process.kill()
    assert not alive, f"left behind after SIGTERM: {[p.pid for p in alive]}\n{server.log_tail()}"


@pytest.fixture(scope="session")
def servers(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, embedded_model_dir: Path
) -> Iterator[tuple[Server, Server]]:
    workdir = tmp_path_factory.mktemp("e2e")
    keys = {name: "hs-test-" + secrets.token_urlsafe(16) for name in KEY_LIMITS}
    config = workdir / "configuration.yaml"
    _write_config(config, keys, redis_url)
    models = embedded_model_dir.parents[1]  # the user's store, shared by both servers' homes
    started = [_start(config, workdir / f"server-{i}", keys, models, _cpu_share(i, 2)) for i in range(2)]
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        for server in started:
            _wait_ready(server, deadline)
        yield started[0], started[1]
    finally:
        left_behind = []
        for server in started:
            try:
                _stop(server)
            except AssertionError as exc:
                left_behind.append(str(exc))
        assert not left_behind, left_behind


@pytest.fixture(scope="session")
def server(servers: tuple[Server, Server]) -> Server:
    return servers[0]


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return server.client()
