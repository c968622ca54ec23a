"""Fixtures shared by every tier, and the tiers themselves: a test's folder is its tier."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.redis import RedisServer
from tests.support.servers import REPO
from tests.support.stalls import STALL_S, WATCH

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "packaging", "e2e")


def pytest_configure(config: pytest.Config) -> None:
    WATCH.start()


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    WATCH.test = nodeid


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Where the test process stood still (a paused machine, say): a failure near one may be
    the machine's, not the service's."""
    stalls = WATCH.stalls
    terminalreporter.write_sep("-", f"stalls of the test process (>= {STALL_S:g}s): {len(stalls)}")
    for stall in stalls:
        terminalreporter.write_line(f"{stall.seconds:6.1f}s during {stall.test or 'collection'}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = item.path.relative_to(TESTS).parts[0]
        if tier in TIERS:
            item.add_marker(tier)


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
