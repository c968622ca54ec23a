"""Fixtures shared by every tier, and the tiers themselves: a test's folder is its tier.

| tier | proves | with |
|---|---|---|
| ``unit`` | each module, on virtual time (looptime) | nothing |
| ``packaging`` | bentos, compose and Kubernetes files | ``bentoml build``, docker-compose |
| ``gateway`` (e2e) | the gateway's own behaviour | real ``bentoml serve`` processes over the scripted engine |
| ``engine`` (e2e) | the protocol surface | ONE real vLLM server with the embedded weights |

Tiers run in that order; the e2e tiers' servers start as soon as collection ends, so the real
engine warms up while the fast tiers run (tests/support/fleet.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import fleet
from tests.support.redis import RedisServer
from tests.support.servers import REPO

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "packaging", "gateway", "engine")
E2E = frozenset({"gateway", "engine"})


def tier(item: pytest.Item) -> str:
    return item.path.relative_to(TESTS).parts[0]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if tier(item) in TIERS:
            item.add_marker(tier(item))
        if tier(item) in E2E:
            item.add_marker("e2e")
    # Stable sort: within a tier, files and tests keep their order; a test that restarts its
    # tier's engine goes last in it.
    items.sort(
        key=lambda item: (
            TIERS.index(tier(item)) if tier(item) in TIERS else len(TIERS),
            item.get_closest_marker("disruptive") is not None,
        )
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    wanted = {tier(item) for item in session.items} & E2E
    if wanted:
        fleet.launch(wanted)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if fleet.FLEET is not None:
        left = fleet.FLEET.stop()
        fleet.FLEET = None
        if left:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
            print(f"\nleft behind after SIGTERM (killed): {left}", file=sys.stderr)


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The embedded model's version directory in the user's BentoML store, which
    ``./scripts/test`` fills before pytest starts, as the project's own command finds it."""
    found = subprocess.run(
        [sys.executable, "-m", "hermes_serve.models", "path", "smollm2-135m-instruct:latest"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return Path(found)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server. Required in CI; skipped elsewhere if missing."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is required in CI (.ci/run installs it)")
        pytest.skip("redis-server not installed (apt-get install redis-server)")
    server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url
