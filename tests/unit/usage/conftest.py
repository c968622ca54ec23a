"""The usage ledger's stores for its tests: a SQLite file, and a real Postgres server (the same
tests run on both)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from hermes_serve.usage.store import (
    PostgresStore,
    SqliteStore,
)
from hermes_serve.usage.writer import Writer as UsageLedger
from tests.support.postgres import BINDIR, PostgresServer
from tests.support.usage import (
    NOW,
    Backend,
    Ledgers,
)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A private Postgres server. Required in CI; skipped elsewhere if missing."""
    missing = None if (BINDIR / "initdb").exists() else f"{BINDIR}/initdb (apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing = "psycopg (pip install 'psycopg[binary]')"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"Postgres is required in CI: {missing} is missing")
        pytest.skip(f"{missing} is not installed")
    server = PostgresServer()
    server.start()
    yield server
    server.remove()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        path = tmp_path / "state" / "usage.db"

        @contextmanager
        def locked() -> Iterator[None]:
            # Another process holding SQLite's write lock: every write waits, then fails.
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            finally:
                conn.execute("ROLLBACK")
                conn.close()

        return Backend("sqlite", f"sqlite:///{path}", lambda: SqliteStore(path, busy_timeout_s=0.25), locked)
    server: PostgresServer = request.getfixturevalue("postgres_server")
    url = server.create_database()

    @contextmanager
    def stopped() -> Iterator[None]:
        server.stop()
        try:
            yield
        finally:
            server.start()

    return Backend("postgres", url, lambda: PostgresStore(url, connect_timeout_s=2), stopped)


@pytest.fixture
async def ledgers(backend: Backend, tmp_path: Path) -> AsyncIterator[Ledgers]:
    """Started ledgers over the test's database (one spill file unless told), closed after."""
    opened: list[UsageLedger] = []

    async def start(spill: Path = tmp_path / "spill.jsonl", **options: Any) -> UsageLedger:
        # The calendar is the test's: pruning by the real date would one day delete its rows.
        ledger = UsageLedger(backend.make(), spill, **({"wall_clock": lambda: NOW} | options))
        await ledger.start()
        opened.append(ledger)
        return ledger

    yield start
    for ledger in opened:
        await ledger.close(timeout_s=1)
