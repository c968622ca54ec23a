"""The e2e tiers' servers, started the moment pytest knows which tiers it will run.

- **Gateway tier**: real ``bentoml serve`` processes whose engine is the scripted one
  (``model.source: fake://``), ready in seconds. Each scenario has its own settings: a pair of
  replicas over one Redis for keys, limits and reloads; a pair over a Redis that starts out
  down, for the faults; a pair with a short request limit, for a replica killed with
  reservations held; one server per fate of a full gateway; one whose engine dies.
- **Engine tier**: ONE real vLLM server with the embedded weights and two tiny LoRA adapters,
  kept warm for every test of the protocol surface.

Both are started from ``pytest_collection_finish`` (tests/conftest.py), so the real engine's
minute or two of start-up runs while the unit tests do; each tier's fixtures then wait for
readiness. Everything is stopped, and checked to leave nothing behind, when the session ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import servers
from tests.support.postgres import BINDIR, PostgresServer
from tests.support.redis import RedisServer
from tests.support.servers import REPO, Server

READY_TIMEOUT_S = float(os.environ.get("HERMES_TEST_READY_TIMEOUT", "900"))
SCRIPTED = "scripted"  # the scripted engine's served name: no test mistakes it for a model
MODEL = "smollm2-135m-instruct"
APP_ORIGIN = "https://app.example.com"
RELOAD_INTERVAL_S = 1
REPLICA_REQUEST_TIMEOUT_S = 3

FRONT_KEYS: dict[str, dict[str, Any]] = {
    "tester": {},
    "limited": {"requests_per_minute": 3},
    "shared": {"requests_per_minute": 3},
    "thrifty": {"tokens_per_minute": 300},
    "daily": {"tokens_per_day": 200},  # the day budget two replicas share
    "fuzz": {},  # the contract's: no limit, so no answer depends on when the case is sent
    "meter": {"tokens_per_minute": 1_000_000},  # charges read exactly
}
FAULT_KEYS: dict[str, dict[str, Any]] = {
    "tester": {},
    "guarded": {"requests_per_minute": 100_000},  # any limit: its requests need the storage
    **{f"crowd-{i}": {} for i in range(1, 6)},
}
REPLICA_KEYS: dict[str, dict[str, Any]] = {"tester": {}, "held": {"tokens_per_minute": 2_000}}
SINGLE_KEYS: dict[str, dict[str, Any]] = {"tester": {}, "other": {}}
LEDGER_KEYS: dict[str, dict[str, Any]] = {
    "tester": {},
    "admin": {"admin": True},
    "other": {},
    "summed": {},  # test_usage's sum over both replicas alone
    "daily": {"tokens_per_day": 100_000, "requests_per_day": 10_000},  # a day budget both replicas hold
}
KEPT_KEYS: dict[str, dict[str, Any]] = {
    "tester": {},
    "daily": {"tokens_per_day": 100_000, "requests_per_day": 10_000},  # kept across a restart
}
ENGINE_KEYS: dict[str, dict[str, Any]] = {
    "tester": {},
    "meter": {"tokens_per_minute": 1_000_000},  # test_accounting's alone: its charges are exact
    "cache-a": {},  # the prefix-cache keys
    "cache-b": {},
    "base-only": {"models": [MODEL]},
    "console": {"tokens_per_day": 1_000_000},  # the console's standing shows a budget
}
ADAPTERS = {"tiny-zero": 0.0, "tiny-random": 1.0}  # name: scale of the adapter's B matrices


def _keys(names: dict[str, dict[str, Any]], prefix: str) -> tuple[dict[str, str], list[dict[str, Any]]]:
    secrets_by_name = {name: f"hs-{prefix}-" + secrets.token_urlsafe(16) for name in names}
    stanzas = [
        {"name": name, "sha256": hashlib.sha256(secrets_by_name[name].encode()).hexdigest(), **limits}
        for name, limits in names.items()
    ]
    return secrets_by_name, stanzas


RELAY_KEYS: dict[str, dict[str, Any]] = {
    "tester": {},
    "daily": {"tokens_per_day": 100_000, "requests_per_day": 10_000},  # one budget over both replicas
    **{f"tenant-{i}": {} for i in range(8)},  # keys to spread over the router's engines
}
TENANT_SECRET = "shared-by-every-replica"


@dataclass
class Helper:
    """A program a scenario needs beside the gateways: a scripted engine served alone, a router."""

    name: str
    url: str
    command: list[str]
    log: Path
    record: Path | None = None
    """Every request the engine received (``--record``)."""
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command, cwd=REPO, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
        )

    def stop(self, kill: bool = False) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if not kill:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):  # streams still open: no longer
                self.process.wait(timeout=10)
                return
        self.process.kill()
        self.process.wait(timeout=30)

    def received(self) -> list[dict[str, Any]]:
        assert self.record is not None
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line.strip()]

    def metric(self, name: str) -> float:
        import httpx

        return servers.Scrape(httpx.get(f"{self.url}/metrics", timeout=10).text).value(name)


@dataclass
class Fleet:
    workdir: Path
    redis_binary: str | None
    gateway: dict[str, Server] = field(default_factory=dict)
    engine: Server | None = None
    redises: dict[str, RedisServer] = field(default_factory=dict)
    postgres: PostgresServer | None = None
    helpers: dict[str, Helper] = field(default_factory=dict)
    problem: str | None = None
    """Why a tier's servers could not start (reported by its fixtures)."""

    # --- the gateway tier ---------------------------------------------------------------------

    def start_gateway(self) -> None:
        if self.redis_binary is None:
            self.problem = "redis-server not installed (apt-get install redis-server; .ci/run installs it)"
            return
        main = self._redis("main", start=True)
        faults = self._redis("faults", start=False)  # the fault servers start while it is down
        base = {"admission": {"max_concurrency": 8, "max_queue": 16, "queue_timeout_s": 600, "request_timeout_s": 600}}
        self._pair(
            "front",
            FRONT_KEYS,
            {**base, "limits_storage": main.url, "server": {"max_body_bytes": 65536}},
            second_environment={
                "HERMES_SERVER__CORS_ORIGINS": json.dumps([APP_ORIGIN]),
                "HERMES_MODEL__ADAPTERS": "[]",
            },
        )
        crowd = {"max_concurrency": 64, "max_queue": 50, "queue_timeout_s": 60, "request_timeout_s": 60}
        self._pair("faults", FAULT_KEYS, {"admission": crowd, "limits_storage": faults.url})
        replica = {"queue_timeout_s": 60, "request_timeout_s": REPLICA_REQUEST_TIMEOUT_S}
        self._pair("replicas", REPLICA_KEYS, {"admission": replica, "limits_storage": main.url})
        one = {"max_concurrency": 1, "max_queue": 1}
        self._single("request-limit", {"admission": {"max_concurrency": 4, "request_timeout_s": 2}})
        self._single("queue-wait", {"admission": {**one, "queue_timeout_s": 1, "request_timeout_s": 600}})
        self._single("queue-full", {"admission": {**one, "queue_timeout_s": 600, "request_timeout_s": 600}})
        self._single("mortal", {}, start_gate=True)
        # The usage ledger: the default (SQLite in the state directory, memory:// limits), and a
        # pair writing one Postgres over one Redis.
        self._single("kept", {}, names=KEPT_KEYS)
        if not (BINDIR / "initdb").exists():
            self.problem = f"Postgres is not installed ({BINDIR}/initdb; apt-get install postgresql)"
            return
        self.postgres = PostgresServer()
        self.postgres.start()
        ledger = self._redis("ledger", start=True)
        store = self.postgres.create_database()
        self._pair("ledger", LEDGER_KEYS, {"limits_storage": ledger.url, "usage": {"store": store}})
        self._relays(self._redis("relay", start=True))

    def _relays(self, redis: RedisServer) -> None:
        """The gateway over HTTP engines (``model.upstream``): a pair of replicas in front of
        vLLM's router over two scripted engines, and one server straight over a third."""
        assert self.postgres is not None
        pool = [self._engine("engine-a"), self._engine("engine-b")]
        router = self._router("router", pool)
        upstream = {"upstream": router.url, "tenant_secret": TENANT_SECRET, "upstream_api_key": "upstream-credential"}
        settings = {
            "limits_storage": redis.url,
            "usage": {"store": self.postgres.create_database()},
            "admission": {"request_timeout_s": 60, "queue_timeout_s": 60},
        }
        self._pair("relay", RELAY_KEYS, settings, upstream=upstream)
        solo = self._engine("engine-solo")
        self._single(
            "direct",
            {"admission": {"request_timeout_s": 60}},
            upstream={"upstream": solo.url, "upstream_read_timeout_s": 2},
        )

    def _engine(self, name: str) -> Helper:
        folder = self.workdir / name
        (folder / "gates").mkdir(parents=True)
        port = servers.free_port()
        record = folder / "requests.jsonl"
        command = [sys.executable, "-m", "hermes_serve.fake_engine", "--port", str(port), "--record", str(record)]
        command += ["--source", f"fake://?gates={folder / 'gates'}"]
        helper = self.helpers[name] = Helper(name, f"http://127.0.0.1:{port}", command, folder / "log", record)
        helper.start()
        return helper

    def _router(self, name: str, workers: list[Helper]) -> Helper:
        folder = self.workdir / name
        folder.mkdir()
        port = servers.free_port()
        command = [str(Path(sys.executable).with_name("vllm-router")), "--host", "127.0.0.1", "--port", str(port)]
        command += ["--worker-urls", *(w.url for w in workers), "--policy", "consistent_hash"]
        # Notice a worker's start and death within seconds (the defaults wait 30 s and 60 s).
        command += ["--worker-startup-check-interval", "1", "--health-check-interval-secs", "1"]
        command += ["--health-failure-threshold", "1", "--health-success-threshold", "1"]
        command += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(servers.free_port())]
        helper = self.helpers[name] = Helper(name, f"http://127.0.0.1:{port}", command, folder / "log")
        helper.start()
        return helper

    def _redis(self, name: str, start: bool) -> RedisServer:
        assert self.redis_binary is not None
        folder = self.workdir / f"redis-{name}"
        folder.mkdir()
        redis = self.redises[name] = RedisServer(self.redis_binary, folder)
        if start:
            redis.start()
        return redis

    def _section(
        self,
        folder: Path,
        stanzas: list[dict[str, Any]],
        settings: dict[str, Any],
        source: str,
        upstream: dict[str, Any] | None = None,
    ) -> Path:
        gates = folder / "gates"
        gates.mkdir(parents=True, exist_ok=True)
        section = {
            "model": {"source": f"fake://?gates={gates}{source}", "served_name": SCRIPTED, **(upstream or {})},
            **settings,
            "auth": {"reload_interval_s": RELOAD_INTERVAL_S, "keys": stanzas},
        }
        config = folder / "configuration.yaml"
        servers.write_config(config, section)
        return config

    def _pair(
        self,
        name: str,
        names: dict[str, dict[str, Any]],
        settings: dict[str, Any],
        second_environment: dict[str, str] | None = None,
        upstream: dict[str, Any] | None = None,
    ) -> None:
        """Two replicas reading one configuration file, as two pods reading one ConfigMap."""
        folder = self.workdir / name
        keys, stanzas = _keys(names, name)
        config = self._section(folder, stanzas, settings, "", upstream)
        for i, environment in enumerate(({}, second_environment or {})):
            server = servers.start(config, folder / f"replica-{i}", keys, environment=environment)
            server.gates = folder / "gates"
            self.gateway[f"{name}-{i}"] = server

    def _single(
        self,
        name: str,
        settings: dict[str, Any],
        start_gate: bool = False,
        names: dict[str, dict[str, Any]] = SINGLE_KEYS,
        upstream: dict[str, Any] | None = None,
    ) -> None:
        folder = self.workdir / name
        keys, stanzas = _keys(names, name)
        gate = folder / "gates" / "engine-start"
        config = self._section(folder, stanzas, settings, f"&start_gate={gate}" if start_gate else "", upstream)
        if start_gate:
            gate.touch()
        server = servers.start(config, folder / "server", keys)
        server.gates = folder / "gates"
        self.gateway[name] = server

    # --- the engine tier ----------------------------------------------------------------------

    def start_engine(self) -> None:
        from tests.support.lora import RANK, write_adapter

        found = subprocess.run(
            [sys.executable, "-m", "hermes_serve.models", "path", f"{MODEL}:latest"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        if found.returncode != 0:
            self.problem = f"the embedded model is not imported (./scripts/test does it): {found.stderr.strip()}"
            return
        model_dir = Path(found.stdout.strip())
        folder = self.workdir / "engine"
        adapters = [
            {"name": name, "source": str(write_adapter(model_dir, folder / "adapters" / name, scale))}
            for name, scale in ADAPTERS.items()
        ]
        keys, stanzas = _keys(ENGINE_KEYS, "engine")
        section = {
            "device": "cpu",
            "model": {
                "served_name": MODEL,
                "max_model_len": 2048,
                "cpu_kvcache_space_gib": 1,
                "adapters": adapters,
                "max_lora_rank": RANK,
            },
            "auth": {"reload_interval_s": RELOAD_INTERVAL_S, "keys": stanzas},
            "admission": {"max_concurrency": 16, "max_queue": 32, "request_timeout_s": 300},
        }
        config = folder / "configuration.yaml"
        servers.write_config(config, section)
        self.engine = servers.start(config, folder / "server", keys, models=model_dir.parents[1])
        self.engine.model_dir = model_dir

    # --- both ---------------------------------------------------------------------------------

    def ready(self, started: list[Server]) -> list[Server]:
        if self.problem is not None:
            if os.environ.get("CI"):
                pytest.fail(self.problem)
            pytest.skip(self.problem)
        deadline = time.monotonic() + READY_TIMEOUT_S
        for server in started:
            try:
                servers.wait_ready(server, deadline)
            except servers.NotReady as exc:
                pytest.fail(str(exc))
        return started

    def stop(self) -> list[str]:
        """Stop everything; returns what was left behind after SIGTERM (then killed)."""
        pids = servers.stop_all(self.everything())
        left = [f"processes {pids}"] if pids else []
        for helper in self.helpers.values():
            helper.stop()
        for redis in self.redises.values():
            redis.stop()
        if self.postgres is not None:
            self.postgres.remove()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return left

    def everything(self) -> list[Server]:
        return [*self.gateway.values(), *([self.engine] if self.engine is not None else [])]


FLEET: Fleet | None = None


def launch(tiers: set[str]) -> Fleet:
    """Start the servers of ``tiers`` ("gateway", "engine") in the background."""
    global FLEET
    FLEET = Fleet(Path(tempfile.mkdtemp(prefix="hermes-e2e-")), shutil.which("redis-server"))
    if "gateway" in tiers:
        FLEET.start_gateway()
    if "engine" in tiers:
        FLEET.start_engine()
    return FLEET


def fleet() -> Fleet:
    assert FLEET is not None, "the e2e servers start when pytest has collected an e2e test"
    return FLEET
