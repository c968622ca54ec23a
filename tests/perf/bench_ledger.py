"""The usage ledger's write path: rows per second and bytes per row, SQLite and Postgres side
by side in one run (``./scripts/bench ledger [--rows 100000]``).

A row is one finished request; a gateway serving a few thousand requests a second needs a
fraction of either store's rate. Postgres is a private server started here (Debian's
``postgresql``), skipped with a note when it is not installed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from hermes_serve.usage.store import PostgresStore, SqliteStore, Store, UsageRow
from tests.support.postgres import BINDIR, PostgresServer

BATCH = 5000  # the writer's batch_rows


def rows(count: int, start: float) -> list[UsageRow]:
    return [
        UsageRow(
            request_id=f"{i:024x}",
            started=start + i / 1000,
            ended=start + i / 1000 + 0.5,
            key=f"app-{i % 20}",
            model=("base", "adapter")[i % 2],
            api=("chat", "completions", "responses", "messages")[i % 4],
            status=200,
            input_tokens=300 + i % 50,
            cached_input_tokens=128,
            output_tokens=40 + i % 30,
            queue_wait_s=0.01,
            client_request_id=f"job-{i}" if i % 3 == 0 else None,
            end_user=f"person-{i % 500}" if i % 2 == 0 else None,
            admitted=True,
        )
        for i in range(count)
    ]


def measure(store: Store, batch: list[UsageRow]) -> float:
    store.migrate()
    started = time.perf_counter()
    for offset in range(0, len(batch), BATCH):
        store.write(batch[offset : offset + BATCH])
    return len(batch) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    batch = rows(args.rows, time.time() - 3600)
    print(f"{args.rows} rows, batches of {BATCH}, one writer")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "usage.db"
        sqlite = SqliteStore(path)
        rate = measure(sqlite, batch)
        sqlite.query("PRAGMA wal_checkpoint(TRUNCATE)")
        sqlite.close()
        print(f"  SQLite (WAL, synchronous=FULL): {rate:,.0f} rows/s, {os.path.getsize(path) / args.rows:.0f} B/row")
    if not (BINDIR / "initdb").exists():
        print("  Postgres: not installed (apt-get install postgresql): skipped")
        return
    server = PostgresServer()
    server.start()
    try:
        postgres = PostgresStore(server.create_database())
        rate = measure(postgres, batch)
        (size,) = postgres.query("SELECT pg_total_relation_size('usage_requests')")[0]
        postgres.close()
        print(f"  Postgres (psycopg 3, one unnest insert a batch): {rate:,.0f} rows/s, {size / args.rows:.0f} B/row")
    finally:
        server.remove()


if __name__ == "__main__":
    main()
