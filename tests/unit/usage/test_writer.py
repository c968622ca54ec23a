"""Writing the ledger: batches within a second, replays that write nothing twice, a store
that is down or slow, a process killed outright, closing, pruning."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hermes_serve.usage.reports import (
    completions_usage,
)
from hermes_serve.usage.store import (
    SqliteStore,
)
from hermes_serve.usage.writer import SpillFile
from hermes_serve.usage.writer import Writer as UsageLedger
from tests.support.servers import REPO
from tests.support.usage import (
    DAY0,
    MIXED,
    NOW,
    Backend,
    Ledgers,
    by_id,
    expected_rollups,
    row,
    spilled,
    stored,
    stored_rollups,
)


async def test_rows_are_written_within_a_second_without_being_asked(ledgers: Ledgers) -> None:
    ledger = await ledgers()
    start = asyncio.get_running_loop().time()
    for r in MIXED:
        ledger.record(r)
    async with asyncio.timeout(1):
        while ledger.counters.rows_written < len(MIXED):
            await ledger.wait_cycle()
    assert asyncio.get_running_loop().time() - start < 1


async def test_a_replay_writes_nothing_twice(backend: Backend, ledgers: Ledgers) -> None:
    ledger = await ledgers()
    for r in MIXED:
        ledger.record(r)
    assert await ledger.flush()
    for r in [*MIXED, row(8), row(8)]:  # everything again, and one new row twice
        ledger.record(r)
    assert await ledger.flush()
    store = backend.make()
    assert store.write(MIXED) == 0
    store.close()
    assert stored(backend) == by_id([*MIXED, row(8)])
    assert stored_rollups(backend) == expected_rollups([*MIXED, row(8)])
    assert ledger.counters.rows_written == len(MIXED) + 1
    assert ledger.counters.rows_duplicate == len(MIXED) + 1  # row 8's second copy too


async def test_two_replicas_writing_the_same_rows_count_them_once(
    backend: Backend, ledgers: Ledgers, tmp_path: Path
) -> None:
    first, second = await ledgers(tmp_path / "a.jsonl"), await ledgers(tmp_path / "b.jsonl")
    for r in MIXED:
        first.record(r)
        second.record(r)
    assert await asyncio.gather(first.flush(), second.flush()) == [True, True]
    assert stored_rollups(backend) == expected_rollups(MIXED)
    assert first.counters.rows_written + second.counters.rows_written == len(MIXED)


async def test_while_the_store_is_down_rows_spill_and_arrive_when_it_is_back(
    backend: Backend, ledgers: Ledgers
) -> None:
    ledger = await ledgers()
    ledger.record(MIXED[0])
    assert await ledger.flush()
    with backend.outage():
        for r in MIXED[1:4]:
            ledger.record(r)
        assert not await ledger.flush()
        assert spilled(ledger.spill_path) == [r.request_id for r in MIXED[1:4]]
        assert ledger.queue_depth == 3 and ledger.counters.write_failures >= 1
        for r in MIXED[4:]:
            ledger.record(r)  # requests go on as before: nothing waits for the store
        while ledger.queue_depth != len(spilled(ledger.spill_path)):
            await ledger.wait_cycle()
        assert spilled(ledger.spill_path) == [r.request_id for r in MIXED[1:]]
    assert await ledger.flush()
    assert stored(backend) == by_id(MIXED)
    assert stored_rollups(backend) == expected_rollups(MIXED)
    assert ledger.queue_depth == 0 and ledger.spill_path.stat().st_size == 0


async def test_when_neither_store_nor_disk_takes_rows_they_stay_in_memory(
    backend: Backend, ledgers: Ledgers, tmp_path: Path
) -> None:
    unwritable = tmp_path / "spill-is-a-folder"
    unwritable.mkdir()
    ledger = await ledgers(unwritable)
    with backend.outage():
        for r in MIXED:
            ledger.record(r)
        assert not await ledger.flush()
        assert ledger.queue_depth == len(MIXED) and ledger.counters.spill_failures >= 1
    assert await ledger.flush()
    assert stored(backend) == by_id(MIXED)


class GatedStore(SqliteStore):
    """A store whose writes hang until the test lets them through."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = threading.Event()

    def write(self, rows: Any) -> int:
        self.gate.wait(30)
        return super().write(rows)


async def test_a_slow_store_does_not_keep_rows_in_memory_past_a_second(tmp_path: Path) -> None:
    store = GatedStore(tmp_path / "usage.db")
    ledger = UsageLedger(store, tmp_path / "spill.jsonl", wall_clock=lambda: NOW)
    await ledger.start()
    loop = asyncio.get_running_loop()
    start = loop.time()
    for r in MIXED:
        ledger.record(r)
    while len(spilled(ledger.spill_path)) < len(MIXED):
        await ledger.wait_cycle()
    assert loop.time() - start < 1
    store.gate.set()
    assert await ledger.flush()
    assert await ledger.close()
    found = SqliteStore(tmp_path / "usage.db").query("SELECT request_id FROM usage_requests")
    assert sorted(r for (r,) in found) == sorted(r.request_id for r in MIXED)
    assert ledger.counters.rows_written == len(MIXED)
    assert ledger.counters.rows_duplicate == len(MIXED)  # the spill file's copy, found already there


async def test_a_new_process_replays_what_the_last_one_spilled(
    backend: Backend, ledgers: Ledgers, tmp_path: Path
) -> None:
    spill = tmp_path / "spill.jsonl"
    SpillFile(spill).append(MIXED)
    with open(spill, "ab") as file:
        file.write(b'{"request_id": "req-torn", "star')  # the process was killed mid-append
    ledger = await ledgers(spill)
    ledger.record(row(9))
    async with asyncio.timeout(1):
        while ledger.queue_depth:
            await ledger.wait_cycle()
    assert stored(backend) == by_id([*MIXED, row(9)])
    assert spill.stat().st_size == 0


CHILD = """
import asyncio, sys, time
from pathlib import Path
from hermes_serve.usage.store import UsageRow, open_store
from hermes_serve.usage.writer import Writer as UsageLedger


async def main():
    spill = Path(sys.argv[2])
    ledger = UsageLedger(open_store(sys.argv[1]), spill)
    await ledger.start()
    loop = asyncio.get_running_loop()
    start = loop.time()
    for n in range(200):
        ended = time.time()  # within retention: the ledger's own pruning must leave them be
        ledger.record(UsageRow(f"req-{n}", started=ended - 1, ended=ended, key="app", input_tokens=n))
    # Durable: committed, or in the spill file on disk.
    while ledger.counters.rows_written + (spill.read_bytes().count(b"\\n") if spill.exists() else 0) < 200:
        await ledger.wait_cycle()
    print(f"{loop.time() - start:.3f}", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.mark.parametrize("store_up", [True, False], ids=["store-up", "store-down"])
def test_a_process_killed_outright_loses_no_row_that_ended_a_second_before(store_up: bool, tmp_path: Path) -> None:
    (tmp_path / "a-file").touch()
    # Down: its folder cannot be made, so no write ever succeeds.
    path = tmp_path / "usage.db" if store_up else tmp_path / "a-file" / "usage.db"
    url = f"sqlite:///{path}"
    spill = tmp_path / "spill.jsonl"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, url, str(spill)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        durable_after = float(child.stdout.readline())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert durable_after < 1
    committed = SqliteStore(path).query("SELECT request_id FROM usage_requests") if store_up else []
    assert {r for (r,) in committed} | set(spilled(spill) if spill.exists() else []) == {f"req-{n}" for n in range(200)}


async def test_close_writes_what_is_queued(backend: Backend, ledgers: Ledgers) -> None:
    ledger = await ledgers()
    for r in MIXED:
        ledger.record(r)
    assert await ledger.close()
    assert stored(backend) == by_id(MIXED)


async def test_close_with_the_store_down_leaves_the_rows_for_the_next_start(
    backend: Backend, ledgers: Ledgers, tmp_path: Path
) -> None:
    ledger = await ledgers()
    with backend.outage():
        for r in MIXED:
            ledger.record(r)
        assert not await ledger.close(timeout_s=1)
    assert spilled(ledger.spill_path) == [r.request_id for r in MIXED]
    after = await ledgers()
    async with asyncio.timeout(1):
        while after.queue_depth:
            await after.wait_cycle()
    assert stored(backend) == by_id(MIXED)
    assert stored_rollups(backend) == expected_rollups(MIXED)


async def test_close_drains_the_spill_file_once_the_store_is_back(backend: Backend, ledgers: Ledgers) -> None:
    ledger = await ledgers()
    with backend.outage():
        for r in MIXED:
            ledger.record(r)
        assert not await ledger.flush()
    assert await ledger.close()
    assert stored(backend) == by_id(MIXED)


async def test_pruning_deletes_old_rows_and_keeps_the_rollups(backend: Backend, ledgers: Ledgers) -> None:
    old = [
        replace(r, request_id=r.request_id + "-old", started=r.started - 100 * 86400, ended=r.ended - 100 * 86400)
        for r in MIXED
    ]
    ledger = await ledgers(wall_clock=lambda: NOW, retention_days=90)
    for r in [*old, *MIXED]:
        ledger.record(r)
    assert await ledger.flush()
    assert await ledger.prune() == len(old)
    assert stored(backend) == by_id(MIXED)
    assert stored_rollups(backend) == expected_rollups([*old, *MIXED])
    store = backend.make()
    start = DAY0 - 100 * 86400
    days = completions_usage(store, start_time=start, end_time=start + 86400, now=NOW)
    assert days["data"][0]["results"][0]["num_model_requests"] == 5
    minutes = completions_usage(store, start_time=start, end_time=start + 86400, bucket_width="1m", limit=1440, now=NOW)
    assert not any(bucket["results"] for bucket in minutes["data"])  # minutes come from the pruned ledger
