"""The ledger's stores: rows and rollups together, bounds, schema migrations (an upgrade from
the first version), the store chosen by URL."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from hermes_serve.usage.store import (
    COLUMNS,
    END_USER_MAX,
    MIGRATIONS,
    LedgerError,
    Migration,
    PostgresStore,
    SqliteStore,
    Store,
    UsageRow,
    open_store,
    rollups,
)
from tests.support.usage import (
    MIXED,
    T0,
    Backend,
    Ledgers,
    by_id,
    expected_rollups,
    row,
    schema_rows,
    stored,
    stored_rollups,
)


async def test_rows_and_rollups_are_written_together(backend: Backend, ledgers: Ledgers) -> None:
    ledger = await ledgers()
    for r in MIXED:
        ledger.record(r)
    assert await ledger.flush()
    assert stored(backend) == by_id(MIXED)
    assert stored_rollups(backend) == expected_rollups(MIXED)
    assert ledger.counters.rows_written == len(MIXED)
    assert ledger.queue_depth == 0
    assert not ledger.spill_path.exists() or ledger.spill_path.stat().st_size == 0


async def test_rows_keep_to_their_bounds(backend: Backend, ledgers: Ledgers) -> None:
    odd = row(12, end_user="a\x00b" + "x" * 100, key="k\ud800", client_request_id="c" * 600)
    assert (
        odd.end_user == "ab" + "x" * (END_USER_MAX - 3) and odd.key == "k?" and len(odd.client_request_id or "") == 512
    )
    ledger = await ledgers()
    ledger.record(odd)
    assert await ledger.flush()
    assert stored(backend) == [odd]


V1_COLUMNS = COLUMNS[:-1]  # version 2 added ``admitted``


def write_as_version_1(store: Store, rows: list[UsageRow]) -> None:
    """What version 1's code wrote: its columns, its rollups."""
    store.query("SELECT 1")  # connect
    with store._transaction() as cursor:
        for r in rows:
            cursor.execute(
                store._sql(f"INSERT INTO usage_requests ({', '.join(V1_COLUMNS)}) VALUES ({', '.join('?' * 14)})"),
                r.values()[:-1],
            )
        cursor.executemany(
            store._sql(
                "INSERT INTO usage_rollups (key_name, hour, model, requests, model_requests, errors, input_tokens,"
                " cached_tokens, output_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ),
            [group[:-1] for group in rollups(rows)],
        )


async def test_an_upgrade_from_version_1_keeps_every_row(backend: Backend) -> None:
    old = backend.make()
    assert old.migrate(MIGRATIONS[:1]) == 1
    write_as_version_1(old, MIXED)
    old.close()
    rollups_before = stored_rollups(backend)

    new = backend.make()
    assert new.migrate() == 2 == len(MIGRATIONS)
    assert new.migrate() == 2  # again: nothing to do
    assert schema_rows(new) == [(1,), (2,)]
    # Every row kept; version 1 knew only whether tokens were charged, the nearest "admitted".
    assert stored(backend) == by_id([replace(r, admitted=r.model_request) for r in MIXED])
    assert stored_rollups(backend) == rollups_before
    assert new.query("SELECT SUM(admitted) FROM usage_rollups") == [(sum(r.model_request for r in MIXED),)]
    assert new.write([row(13, admitted=True)]) == 1  # the upgraded tables take rows as before
    assert stored_rollups(backend)[("app", T0, "m1")][0] == rollups_before[("app", T0, "m1")][0] + 1
    new.close()

    # Code that knows only version 1 refuses to write into a newer schema.
    with pytest.raises(LedgerError, match="version 2"):
        backend.make().migrate(MIGRATIONS[:1])


async def test_a_migration_that_fails_changes_nothing(backend: Backend) -> None:
    store = backend.make()
    store.migrate()
    store.write(MIXED)
    broken = Migration(3, ("ALTER TABLE usage_requests ADD COLUMN ttft_ms INTEGER", "NOT SQL AT ALL"))
    with pytest.raises(Exception, match=r"(?i)syntax"):
        store.migrate([*MIGRATIONS, broken])
    assert schema_rows(store) == [(1,), (2,)]
    with pytest.raises(Exception, match="ttft_ms"):
        store.query("SELECT ttft_ms FROM usage_requests")
    assert stored(backend) == by_id(MIXED)
    store.close()


async def test_replicas_starting_together_migrate_once(backend: Backend) -> None:
    stores = [backend.make() for _ in range(4)]
    assert await asyncio.gather(*(asyncio.to_thread(s.migrate) for s in stores)) == [2] * 4
    assert schema_rows(stores[0]) == [(1,), (2,)]
    for s in stores:
        s.close()


def test_a_store_is_chosen_by_its_url(tmp_path: Path) -> None:
    assert open_store("none") is None and open_store("") is None
    sqlite_store = open_store(f"sqlite:///{tmp_path}/usage.db")
    assert isinstance(sqlite_store, SqliteStore) and sqlite_store.path == tmp_path / "usage.db"
    relative = open_store("sqlite:///state/usage.db")
    assert isinstance(relative, SqliteStore) and relative.path == Path("state/usage.db")
    assert isinstance(open_store("postgresql://u@db:5432/usage"), PostgresStore)
    assert isinstance(open_store("postgres://u@db/usage"), PostgresStore)
    for bad in ("mysql://db/usage", "sqlite:///:memory:", "sqlite:///"):
        with pytest.raises(LedgerError):
            open_store(bad)


def test_a_sqlite_ledger_is_in_wal_mode(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "usage.db")
    store.migrate()
    assert store.query("PRAGMA journal_mode") == [("wal",)]
