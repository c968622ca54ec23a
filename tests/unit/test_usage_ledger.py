"""The usage ledger, on SQLite files and on a real Postgres server (the same tests for both):
rows and rollups, replays, a store that is down or slow, a killed process, closing, pruning,
migrations, OpenAI's usage API through its own SDK, end users and the operators' CLI."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from base64 import b64encode
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from struct import pack
from typing import Any
from urllib.parse import parse_qsl

import httpx
import openai
import pytest
from openai.types.admin.organization.usage_completions_response import UsageCompletionsResponse

from hermes_serve.usage.__main__ import main
from hermes_serve.usage.reports import (
    Totals,
    UsageQueryError,
    completions_usage,
    completions_usage_query,
    end_user_rows,
    end_user_totals,
    key_usage,
)
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
from hermes_serve.usage.writer import SpillFile
from hermes_serve.usage.writer import Writer as UsageLedger
from tests.support.postgres import BINDIR, PostgresServer
from tests.support.servers import REPO

DAY0 = int(datetime(2026, 12, 4, tzinfo=UTC).timestamp())
T0 = DAY0 + 10 * 3600  # 10:00 UTC
NOW = T0 + 2 * 3600


def row(n: int | str, at: float = T0, **fields: Any) -> UsageRow:
    values: dict[str, Any] = {
        "request_id": f"req-{n}",
        "started": at - 1.5,
        "ended": at,
        "key": "app",
        "model": "m1",
        "api": "chat",
        "status": 200,
        "input_tokens": 10,
        "cached_input_tokens": 4,
        "output_tokens": 5,
        "queue_wait_s": 0.25,
    }
    return UsageRow(**(values | fields))


NOTHING = {"cached_input_tokens": 0, "output_tokens": 0}
MIXED = [
    row(1),
    row(2, at=T0 + 0.125, model="m2", input_tokens=100, cached_input_tokens=0, output_tokens=50),
    row(3, at=T0 + 3600.5, end_user="user-1", client_request_id="client 3"),
    row(4, key="other", api="messages", end_user="user-1"),
    row(5, status=429, outcome="rate_limit_exceeded", input_tokens=0, **NOTHING),
    row(6, key="unknown", model="", api=None, status=401, outcome="invalid_api_key", input_tokens=0, **NOTHING),
    row(7, status=499, outcome="client_closed_request", output_tokens=2, end_user="user-2"),
]


@dataclass
class Backend:
    name: str
    url: str
    make: Callable[[], Store]
    """A new store (its own connections) over this test's database."""
    outage: Callable[[], AbstractContextManager[None]]
    """The store refuses every write while inside."""


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


Ledgers = Callable[..., Awaitable[UsageLedger]]


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


def stored(backend: Backend) -> list[UsageRow]:
    store = backend.make()
    try:
        rows = store.query(f"SELECT {', '.join(COLUMNS)} FROM usage_requests ORDER BY request_id")
    finally:
        store.close()
    return [UsageRow.from_values(values) for values in rows]


def stored_rollups(backend: Backend) -> dict[tuple[str, int, str], tuple[int, ...]]:
    store = backend.make()
    try:
        rows = store.query(
            "SELECT key_name, hour, model, requests, model_requests, errors, input_tokens, cached_tokens,"
            " output_tokens FROM usage_rollups"
        )
    finally:
        store.close()
    return {(k, int(h), m): tuple(int(v) for v in values) for k, h, m, *values in rows}


def expected_rollups(rows: list[UsageRow]) -> dict[tuple[str, int, str], tuple[int, ...]]:
    sums: dict[tuple[str, int, str], list[int]] = {}
    for r in rows:
        hour = int(r.ended) - int(r.ended) % 3600
        total = sums.setdefault((r.key, hour, r.model), [0] * 6)
        charged = r.input_tokens + r.output_tokens > 0
        for i, value in enumerate(
            [1, charged, r.outcome != "ok", r.input_tokens, r.cached_input_tokens, r.output_tokens]
        ):
            total[i] += int(value)
    return {group: tuple(total) for group, total in sums.items()}


def by_id(rows: list[UsageRow]) -> list[UsageRow]:
    return sorted(rows, key=lambda r: r.request_id)


def spilled(path: Path) -> list[str]:
    """The request ids in a spill file, read from disk as a new process would."""
    if not path.exists():
        return []
    return [json.loads(line)["request_id"] for line in path.read_text().splitlines() if line.strip()]


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
from hermes_serve.usage.store import UsageRow, open_store\nfrom hermes_serve.usage.writer import Writer as UsageLedger

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


async def test_a_key_sees_its_usage_today_and_this_month_per_model(backend: Backend, ledgers: Ledgers) -> None:
    earlier = [row("m1", at=DAY0 - 2 * 86400), row("m2", at=DAY0 - 40 * 86400, model="m2")]
    ledger = await ledgers()
    for r in [*MIXED, *earlier]:
        ledger.record(r)
    assert await ledger.flush()
    usage = key_usage(backend.make(), "app", now=NOW)
    assert usage.today == {
        "m1": Totals(requests=4, model_requests=3, errors=2, input_tokens=30, cached_input_tokens=12, output_tokens=12),
        "m2": Totals(requests=1, model_requests=1, errors=0, input_tokens=100, cached_input_tokens=0, output_tokens=50),
    }
    assert usage.month["m1"].requests == 5 and usage.month["m2"] == usage.today["m2"]
    assert usage.json()["today"]["since"] == "2026-12-04T00:00Z"
    assert key_usage(backend.make(), "nobody", now=NOW).month == {}


def sdk(store: Store, seen: list[dict[str, Any]]) -> openai.OpenAI:
    """The OpenAI SDK, its usage calls answered by ``completions_usage_query`` over ``store``."""

    def answer(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/organization/usage/completions"
        try:
            body = completions_usage_query(store, parse_qsl(request.url.query.decode()), now=NOW)
        except UsageQueryError as exc:
            error = {"message": str(exc), "type": "invalid_request_error", "param": exc.param, "code": None}
            return httpx.Response(400, json={"error": error})
        seen.append(body)
        return httpx.Response(200, json=body)

    return openai.OpenAI(
        api_key="unused",
        admin_api_key="admin",
        base_url="http://ledger.test/v1",
        http_client=httpx.Client(transport=httpx.MockTransport(answer)),
        max_retries=0,
    )


RESULT_KEYS = [
    "object",
    "input_tokens",
    "output_tokens",
    "input_cached_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
    "num_model_requests",
    "project_id",
    "user_id",
    "api_key_id",
    "model",
    "batch",
]


def check_shape(page: dict[str, Any]) -> None:
    """OpenAI's page, exactly: these keys, these types, nothing more."""
    assert list(page) == ["object", "data", "has_more", "next_page"] and page["object"] == "page"
    assert isinstance(page["has_more"], bool) and (page["next_page"] is None) != page["has_more"]
    for bucket in page["data"]:
        assert list(bucket) == ["object", "start_time", "end_time", "results"] and bucket["object"] == "bucket"
        for result in bucket["results"]:
            assert list(result) == RESULT_KEYS
            assert result["object"] == "organization.usage.completions.result"
            assert all(type(result[k]) is int for k in RESULT_KEYS[1:7])
            assert result["project_id"] is result["user_id"] is result["batch"] is None
    UsageCompletionsResponse.model_validate(page)


async def test_the_openai_usage_api_through_its_own_sdk(backend: Backend, ledgers: Ledgers) -> None:
    rows = [*MIXED, row("next-day", at=T0 + 86400, key="other", model="m2", input_tokens=7)]
    ledger = await ledgers()
    for r in rows:
        ledger.record(r)
    assert await ledger.flush()
    seen: list[dict[str, Any]] = []
    usage = sdk(backend.make(), seen).admin.organization.usage

    # Days (the default): every bucket listed, empty ones too; the first is start_time's own day.
    page = usage.completions(start_time=DAY0 - 86400 + 5 * 3600, end_time=DAY0 + 2 * 86400)
    assert [b.start_time for b in page.data] == [DAY0 - 86400, DAY0, DAY0 + 86400]
    assert [b.end_time - b.start_time for b in page.data] == [86400] * 3
    assert page.data[0].results == []
    (today,) = page.data[1].results
    assert (today.input_tokens, today.input_cached_tokens, today.output_tokens) == (140, 16, 67)
    assert today.num_model_requests == 5  # the refusals never reached the model
    assert today.api_key_id is today.model is None
    assert not page.has_more and page.next_page is None

    # Hours, grouped and filtered.
    page = usage.completions(
        start_time=T0,
        end_time=T0 + 2 * 3600,
        bucket_width="1h",
        group_by=["api_key_id", "model", "project_id"],
        api_key_ids=["app"],
    )
    ten, eleven = page.data
    assert [(r.api_key_id, r.model, r.num_model_requests) for r in ten.results] == [("app", "m1", 2), ("app", "m2", 1)]
    assert [(r.api_key_id, r.model, r.input_tokens) for r in eleven.results] == [("app", "m1", 10)]
    assert all(r.project_id is None for r in ten.results)
    page = usage.completions(start_time=T0, end_time=T0 + 3600, bucket_width="1h", group_by=["model"], models=["m2"])
    assert [(r.api_key_id, r.model, r.output_tokens) for r in page.data[0].results] == [(None, "m2", 50)]

    # Minutes come from the ledger; pages of `limit` buckets, followed by next_page.
    buckets = []
    cursor: str | openai.Omit = openai.omit
    while True:
        page = usage.completions(start_time=T0 - 60, end_time=T0 + 300, bucket_width="1m", limit=2, page=cursor)
        buckets += page.data
        if not page.has_more:
            break
        assert page.next_page is not None
        cursor = page.next_page
    assert [b.start_time for b in buckets] == list(range(T0 - 60, T0 + 300, 60))
    assert [sum(r.num_model_requests for r in b.results) for b in buckets] == [0, 4, 0, 0, 0, 0]

    # Projects, users and batches do not exist here.
    assert all(not b.results for b in usage.completions(start_time=DAY0, end_time=DAY0 + 86400, project_ids=["p"]).data)
    assert not usage.completions(start_time=DAY0, end_time=DAY0 + 86400, batch=True).data[0].results
    assert usage.completions(start_time=DAY0, end_time=DAY0 + 86400, batch=False).data[0].results
    for body in seen:
        check_shape(body)


async def test_the_usage_api_defaults_to_openais_page_sizes(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "usage.db")
    store.migrate()
    sizes = {
        width: len(completions_usage(store, start_time=0, end_time=10**8, bucket_width=width, now=NOW)["data"])
        for width in ("1d", "1h", "1m")
    }
    assert sizes == {"1d": 7, "1h": 24, "1m": 60}
    page = completions_usage(store, start_time=NOW - 3 * 86400, now=NOW)  # up to now by default
    assert len(page["data"]) == 4 and not page["has_more"]


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({}, "start_time"),
        ({"start_time": "x"}, "start_time"),
        ({"start_time": "0", "bucket_width": "1w"}, "bucket_width"),
        ({"start_time": "0", "bucket_width": "1d", "limit": "32"}, "limit"),
        ({"start_time": "0", "bucket_width": "1h", "limit": "169"}, "limit"),
        ({"start_time": "0", "bucket_width": "1m", "limit": "0"}, "limit"),
        ({"start_time": "0", "group_by[]": "colour"}, "group_by"),
        ({"start_time": "100", "end_time": "100"}, "end_time"),
        ({"start_time": "0", "page": "nonsense!"}, "page"),
        ({"start_time": "0", "end_time": "86400", "page": "page_" + b64encode(pack(">q", 86400)).decode()}, "page"),
        ({"start_time": "0", "batch": "maybe"}, "batch"),
    ],
)
def test_the_usage_api_refuses_what_it_cannot_answer(tmp_path: Path, query: dict[str, str], param: str) -> None:
    store = SqliteStore(tmp_path / "usage.db")
    store.migrate()
    with pytest.raises(UsageQueryError) as refused:
        completions_usage_query(store, query.items(), now=NOW)
    assert refused.value.param == param


async def test_end_users_are_read_from_the_ledger(backend: Backend, ledgers: Ledgers) -> None:
    long_id = "u" * 200
    extra = [row(10, at=T0 + 60, end_user=long_id), row(11, at=T0 + 120, end_user="user-1", input_tokens=1)]
    ledger = await ledgers()
    for r in [*MIXED, *extra]:
        ledger.record(r)
    assert await ledger.flush()
    store = backend.make()
    found = end_user_rows(store, "app", "user-1", since=DAY0, until=DAY0 + 86400)
    assert [r.request_id for r in found] == ["req-3", "req-11"]  # newest first
    assert found[0] == MIXED[2] and found[0].duration_s == 1.5 and found[0].client_request_id == "client 3"
    assert [r.request_id for r in end_user_rows(store, "app", long_id, since=DAY0, until=DAY0 + 86400)] == ["req-10"]
    totals = {(k, u): t for k, u, t in end_user_totals(store, since=DAY0, until=DAY0 + 86400)}
    assert set(totals) == {("app", "u" * END_USER_MAX), ("app", "user-1"), ("app", "user-2"), ("other", "user-1")}
    assert totals[("app", "user-1")] == Totals(2, 2, 0, 11, 8, 10)
    assert [u for _, u, _ in end_user_totals(store, since=DAY0, until=DAY0 + 86400, key="other")] == ["user-1"]


async def test_rows_keep_to_their_bounds(backend: Backend, ledgers: Ledgers) -> None:
    odd = row(12, end_user="a\x00b" + "x" * 100, key="k\ud800", client_request_id="c" * 600)
    assert (
        odd.end_user == "ab" + "x" * (END_USER_MAX - 3) and odd.key == "k?" and len(odd.client_request_id or "") == 512
    )
    ledger = await ledgers()
    ledger.record(odd)
    assert await ledger.flush()
    assert stored(backend) == [odd]


def schema_rows(store: Store) -> list[tuple[Any, ...]]:
    return [tuple(v) for v in store.query("SELECT version FROM usage_schema ORDER BY version")]


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


async def test_the_cli_reads_the_store(backend: Backend, ledgers: Ledgers) -> None:
    ledger = await ledgers()
    for r in MIXED:
        ledger.record(r)
    assert await ledger.flush()
    window = ["--since", "2026-12-04T00:00:00Z", "--until", "2026-12-05T00:00:00"]

    out = io.StringIO()
    assert main(["--store", backend.url, "--by", "hour", "--group", "model", "--csv", *window], out=out) == 0
    lines = list(csv.reader(io.StringIO(out.getvalue())))
    assert lines == [
        ["period", "model", "requests", "errors", "input_tokens", "cached_input_tokens", "output_tokens"],
        ["2026-12-04T10:00Z", "", "1", "1", "0", "0", "0"],
        ["2026-12-04T10:00Z", "m1", "4", "2", "30", "12", "12"],
        ["2026-12-04T10:00Z", "m2", "1", "0", "100", "0", "50"],
        ["2026-12-04T11:00Z", "m1", "1", "0", "10", "4", "5"],
    ]

    out = io.StringIO()
    assert main(["--store", backend.url, "--group", "user", "--csv", *window], out=out) == 0
    users = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [(u["period"], u["key"], u["end_user"], u["requests"]) for u in users] == [
        ("2026-12-04", "app", "", "3"),
        ("2026-12-04", "app", "user-1", "1"),
        ("2026-12-04", "app", "user-2", "1"),
        ("2026-12-04", "other", "user-1", "1"),
        ("2026-12-04", "unknown", "", "1"),
    ]

    out = io.StringIO()
    assert main(["--store", backend.url, *window], out=out) == 0
    table = [line.split() for line in out.getvalue().splitlines()]
    assert table == [
        ["period", "key", "requests", "errors", "input_tokens", "cached_input_tokens", "output_tokens"],
        ["2026-12-04", "app", "5", "2", "130", "12", "62"],
        ["2026-12-04", "other", "1", "0", "10", "4", "5"],
        ["2026-12-04", "unknown", "1", "1", "0", "0", "0"],
    ]


def test_the_cli_runs_as_a_module(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "usage.db")
    store.write(MIXED)
    store.close()
    command = [sys.executable, "-m", "hermes_serve.usage", "--store", f"sqlite:///{tmp_path / 'usage.db'}"]
    result = subprocess.run(
        [*command, "--since", "2026-12-01", "--until", "2026-12-31", "--csv"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].startswith("2026-12-04,app,5,2,130,12,62")
    missing = subprocess.run(
        [sys.executable, "-m", "hermes_serve.usage", "--store", f"sqlite:///{tmp_path / 'none.db'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 1 and "no ledger at" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "none.db").exists()


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
