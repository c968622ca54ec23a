"""Where the usage ledger lives: one narrow row per request that reached the gateway (refusals
and errors included), and hourly rollups per (key, hour, model) updated in the same transaction.

Stores are chosen by URL: ``sqlite:///path`` (WAL, the default, in the state directory),
``postgresql://...`` (psycopg 3, for several replicas), ``none`` (no ledger). The schema
carries its version and migrates forward. Inserts are idempotent on the request id and the
rollups count only rows really inserted, so a replay writes nothing twice.

A row holds ids, times, names and counts: never a prompt, an answer, a body or a key.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

logger = logging.getLogger("hermes_serve.usage")

END_USER_MAX = 64
"""Longest end-user id kept (OpenAI's bound on ``safety_identifier``); longer ones are cut."""
CLIENT_REQUEST_ID_MAX = 512  # the gateway's own bound on X-Client-Request-Id
SHORT_TEXT_MAX = 128  # key names, models, APIs, outcomes
HOUR = 3600
DAY = 86400


class LedgerError(Exception):
    """A store that cannot be used as asked (bad URL, a schema newer than this code)."""


def _text(value: str | None, limit: int) -> str | None:
    # Postgres refuses NUL in text and any driver refuses lone surrogates: either would stop
    # the row, and every row queued behind it, from ever being written.
    if value is None:
        return None
    value = value[:limit].replace("\x00", "")
    return value.encode("utf-8", "replace").decode("utf-8")


@dataclass(frozen=True)
class UsageRow:
    """One request, as the gateway saw it end. Times are wall-clock seconds (UTC epoch)."""

    request_id: str
    started: float
    ended: float
    key: str
    model: str = ""
    """The model or adapter served; empty when the request named none we serve."""
    api: str | None = None
    """``chat``, ``completions``, ``responses``, ``messages``; none for other routes."""
    status: int | None = None
    outcome: str = "ok"
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    queue_wait_s: float = 0.0
    client_request_id: str | None = None
    end_user: str | None = None
    """The app's own id for its end user, where the request names one."""
    admitted: bool = False
    """Whether the key's limits let it in (counted in its request windows); rebuilds budgets."""

    def __post_init__(self) -> None:
        bounds = {
            "request_id": SHORT_TEXT_MAX,
            "key": SHORT_TEXT_MAX,
            "model": SHORT_TEXT_MAX,
            "api": SHORT_TEXT_MAX,
            "outcome": SHORT_TEXT_MAX,
            "client_request_id": CLIENT_REQUEST_ID_MAX,
            "end_user": END_USER_MAX,
        }
        for name, limit in bounds.items():
            object.__setattr__(self, name, _text(getattr(self, name), limit))

    @property
    def duration_s(self) -> float:
        return self.ended - self.started

    @property
    def hour(self) -> int:
        return _ms(self.ended) // (HOUR * 1000) * HOUR

    @property
    def model_request(self) -> bool:
        """Whether the model worked for it: it was charged tokens (a refusal never is)."""
        return self.input_tokens + self.output_tokens > 0

    def values(self) -> tuple[Any, ...]:
        return (
            self.request_id,
            _ms(self.started),
            _ms(self.ended),
            int(self.input_tokens),
            int(self.cached_input_tokens),
            int(self.output_tokens),
            _ms(self.queue_wait_s),
            self.status,
            self.key,
            self.model,
            self.api,
            self.outcome,
            self.end_user,
            self.client_request_id,
            int(self.admitted),
        )

    @classmethod
    def from_values(cls, values: Sequence[Any]) -> UsageRow:
        """A row read back (columns in ``COLUMNS`` order)."""
        v = dict(zip(COLUMNS, values, strict=True))
        return cls(
            request_id=v["request_id"],
            started=v["started_ms"] / 1000,
            ended=v["ended_ms"] / 1000,
            key=v["key_name"],
            model=v["model"],
            api=v["api"],
            status=v["status"],
            outcome=v["outcome"],
            input_tokens=v["input_tokens"],
            cached_input_tokens=v["cached_tokens"],
            output_tokens=v["output_tokens"],
            queue_wait_s=v["queue_ms"] / 1000,
            client_request_id=v["client_request_id"],
            end_user=v["end_user"],
            admitted=bool(v["admitted"]),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str | bytes) -> UsageRow:
        data = json.loads(line)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


COLUMNS = (
    "request_id",
    "started_ms",
    "ended_ms",
    "input_tokens",
    "cached_tokens",
    "output_tokens",
    "queue_ms",
    "status",
    "key_name",
    "model",
    "api",
    "outcome",
    "end_user",
    "client_request_id",
    "admitted",
)


# ---------------------------------------------------------------------------------------------
# Schema


@dataclass(frozen=True)
class Migration:
    """One step of the schema. Statements run in one transaction with the version's record;
    ``{without_rowid}`` becomes SQLite's ``WITHOUT ROWID`` (nothing on Postgres)."""

    version: int
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        (
            # Fixed-width columns first: Postgres pads less.
            """CREATE TABLE usage_requests (
                request_id TEXT PRIMARY KEY,
                started_ms BIGINT NOT NULL,
                ended_ms BIGINT NOT NULL,
                input_tokens INTEGER NOT NULL,
                cached_tokens INTEGER NOT NULL,
                output_tokens INTEGER NOT NULL,
                queue_ms INTEGER NOT NULL,
                status SMALLINT,
                key_name TEXT NOT NULL,
                model TEXT NOT NULL,
                api TEXT,
                outcome TEXT NOT NULL,
                end_user TEXT,
                client_request_id TEXT
            )""",
            # Pruning, and 1-minute buckets.
            "CREATE INDEX usage_requests_ended ON usage_requests (ended_ms)",
            # One end user's rows; most requests name none, and are left out of it.
            "CREATE INDEX usage_requests_end_user ON usage_requests (key_name, end_user, ended_ms)"
            " WHERE end_user IS NOT NULL",
            """CREATE TABLE usage_rollups (
                key_name TEXT NOT NULL,
                hour BIGINT NOT NULL,
                model TEXT NOT NULL,
                requests BIGINT NOT NULL,
                model_requests BIGINT NOT NULL,
                errors BIGINT NOT NULL,
                input_tokens BIGINT NOT NULL,
                cached_tokens BIGINT NOT NULL,
                output_tokens BIGINT NOT NULL,
                PRIMARY KEY (key_name, hour, model)
            ){without_rowid}""",
            # Every key over a time range (the organization usage API).
            "CREATE INDEX usage_rollups_hour ON usage_rollups (hour)",
        ),
    ),
    # Budgets rebuilt at start-up count the requests the limits let in. Rows from before
    # knew only whether tokens were charged: the nearest count there is.
    Migration(
        2,
        (
            "ALTER TABLE usage_requests ADD COLUMN admitted SMALLINT NOT NULL DEFAULT 0",
            "UPDATE usage_requests SET admitted = 1 WHERE input_tokens + output_tokens > 0",
            "ALTER TABLE usage_rollups ADD COLUMN admitted BIGINT NOT NULL DEFAULT 0",
            "UPDATE usage_rollups SET admitted = model_requests",
        ),
    ),
)

_INSERT_ROLLUP = """
INSERT INTO usage_rollups (key_name, hour, model, requests, model_requests, errors,
                           input_tokens, cached_tokens, output_tokens, admitted)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (key_name, hour, model) DO UPDATE SET
    requests = usage_rollups.requests + excluded.requests,
    model_requests = usage_rollups.model_requests + excluded.model_requests,
    errors = usage_rollups.errors + excluded.errors,
    input_tokens = usage_rollups.input_tokens + excluded.input_tokens,
    cached_tokens = usage_rollups.cached_tokens + excluded.cached_tokens,
    output_tokens = usage_rollups.output_tokens + excluded.output_tokens,
    admitted = usage_rollups.admitted + excluded.admitted
"""


def rollups(rows: Iterable[UsageRow]) -> list[tuple[Any, ...]]:
    """The rollup increments of ``rows``, in key order (so replicas lock them in one order)."""
    sums: dict[tuple[str, int, str], list[int]] = {}
    for row in rows:
        totals = sums.setdefault((row.key, row.hour, row.model), [0] * 7)
        totals[0] += 1
        totals[1] += row.model_request
        totals[2] += row.outcome != "ok"
        totals[3] += row.input_tokens
        totals[4] += row.cached_input_tokens
        totals[5] += row.output_tokens
        totals[6] += row.admitted
    return [(*group, *totals) for group, totals in sorted(sums.items())]


class Store:
    """A ledger database: one connection for writes, one for reads, each used by one thread
    at a time. Every method blocks: call them with ``asyncio.to_thread``."""

    _words: ClassVar[dict[str, str]]

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._read_lock = threading.Lock()
        self._conn: Any = None
        self._read_conn: Any = None
        self._ready = False

    def _connect(self) -> Any:
        raise NotImplementedError

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        raise NotImplementedError
        yield

    def _insert(self, cursor: Any, rows: Sequence[UsageRow]) -> list[UsageRow]:
        """Inserts the rows not yet there; returns those it inserted."""
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql

    def _migration_lock(self, cursor: Any) -> None:
        pass

    def _connection(self) -> Any:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken: nothing more to release
                conn.close()

    def migrate(self, migrations: Sequence[Migration] = MIGRATIONS) -> int:
        """Brings the schema to the last of ``migrations`` (all or nothing); returns its version."""
        if [m.version for m in migrations] != list(range(1, len(migrations) + 1)):
            raise ValueError("migrations must be numbered 1, 2, 3... in order")
        with self._transaction() as cursor:
            self._migration_lock(cursor)
            cursor.execute(
                "CREATE TABLE IF NOT EXISTS usage_schema (version INTEGER PRIMARY KEY, applied_ms BIGINT NOT NULL)"
            )
            cursor.execute("SELECT MAX(version) FROM usage_schema")
            current = cursor.fetchone()[0] or 0
            if current > len(migrations):
                raise LedgerError(
                    f"the usage ledger's schema is version {current}, newer than this code's "
                    f"{len(migrations)}: upgrade hermes-serve"
                )
            for migration in migrations[current:]:
                for statement in migration.statements:
                    cursor.execute(statement.format(**self._words))
                cursor.execute(
                    self._sql("INSERT INTO usage_schema (version, applied_ms) VALUES (?, ?)"),
                    (migration.version, _ms(time.time())),
                )
        self._ready = True
        return len(migrations)

    def write(self, rows: Sequence[UsageRow]) -> int:
        """Inserts the rows whose request id is new, and adds exactly those to the rollups, in
        one transaction. Returns how many were new."""
        unique: dict[str, UsageRow] = {}
        for row in rows:
            unique.setdefault(row.request_id, row)
        if not unique:
            return 0
        with self._lock:
            if not self._ready:
                self.migrate()
            with self._transaction() as cursor:
                inserted = self._insert(cursor, list(unique.values()))
                if inserted:
                    cursor.executemany(self._sql(_INSERT_ROLLUP), rollups(inserted))
        return len(inserted)

    def prune(self, before: float, chunk: int = 10_000) -> int:
        """Deletes ledger rows that ended before ``before`` (epoch seconds), ``chunk`` rows per
        transaction so writers are never held up long. Rollups are kept."""
        deleted = 0
        while True:
            with self._transaction() as cursor:
                cursor.execute(
                    self._sql(
                        "DELETE FROM usage_requests WHERE request_id IN "
                        "(SELECT request_id FROM usage_requests WHERE ended_ms < ? LIMIT ?)"
                    ),
                    (_ms(before), chunk),
                )
                count = int(cursor.rowcount)
            deleted += count
            if count < chunk:
                return deleted

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._read_lock:
            for attempt in (1, 2):
                if self._read_conn is None:
                    self._read_conn = self._connect()
                try:
                    return [tuple(row) for row in self._read_conn.execute(self._sql(sql), tuple(params)).fetchall()]
                except Exception:
                    # Once more on a new connection: the server may have restarted since the last read.
                    conn, self._read_conn = self._read_conn, None
                    with contextlib.suppress(Exception):
                        conn.close()
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._drop()
        with self._read_lock:
            if self._read_conn is not None:
                self._read_conn.close()
                self._read_conn = None


class SqliteStore(Store):
    _words: ClassVar[dict[str, str]] = {"without_rowid": " WITHOUT ROWID"}

    def __init__(self, path: Path | str, busy_timeout_s: float = 5.0) -> None:
        super().__init__()
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False)
        deadline = time.monotonic() + self.busy_timeout_s
        while conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            try:
                conn.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError:
                # Switching takes the whole file and does not wait for it: processes opening a
                # new file together (workers, replicas) take turns.
                if time.monotonic() > deadline:
                    conn.close()
                    raise
                time.sleep(0.01)
        # One fsync per batch (a batch or two a second): a commit survives power loss too.
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            conn = self._connection()
            cursor = conn.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                yield cursor
                cursor.execute("COMMIT")
            except BaseException:
                try:
                    cursor.execute("ROLLBACK")
                except sqlite3.Error:
                    self._drop()
                raise

    def _insert(self, cursor: Any, rows: Sequence[UsageRow]) -> list[UsageRow]:
        sql = (
            f"INSERT INTO usage_requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
            "ON CONFLICT (request_id) DO NOTHING"
        )
        inserted = []
        for row in rows:
            cursor.execute(sql, row.values())
            if cursor.rowcount == 1:
                inserted.append(row)
        return inserted


class PostgresStore(Store):
    _words: ClassVar[dict[str, str]] = {"without_rowid": ""}
    _TYPES = ("text", "bigint", "bigint", "int", "int", "int", "int", "smallint") + ("text",) * 6 + ("smallint",)

    def __init__(self, url: str, connect_timeout_s: int = 5, statement_timeout_s: int = 30) -> None:
        super().__init__()
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self.statement_timeout_s = statement_timeout_s

    def _connect(self) -> Any:
        import psycopg

        # Keepalives: a write on a connection to a vanished host fails in seconds, not hours.
        conn = psycopg.connect(
            self.url,
            autocommit=True,
            connect_timeout=self.connect_timeout_s,
            application_name="hermes-serve usage ledger",
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=3,
            keepalives_count=3,
        )
        conn.execute(f"SET statement_timeout = {int(self.statement_timeout_s * 1000)}")
        return conn

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction(), conn.cursor() as cursor:
                    yield cursor
            except BaseException:
                if conn.closed or conn.broken:
                    self._drop()
                raise

    def _migration_lock(self, cursor: Any) -> None:
        # Replicas starting together: one migrates, the others wait and find it done.
        cursor.execute("SELECT pg_advisory_xact_lock(7217310405)")

    def _insert(self, cursor: Any, rows: Sequence[UsageRow]) -> list[UsageRow]:
        # One statement for the whole batch: a column array each, unnested server-side.
        arrays = ", ".join(f"%s::{kind}[]" for kind in self._TYPES)
        cursor.execute(
            f"INSERT INTO usage_requests ({', '.join(COLUMNS)}) SELECT * FROM unnest({arrays}) "
            "ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
            [list(column) for column in zip(*(row.values() for row in rows), strict=True)],
        )
        new = {found for (found,) in cursor.fetchall()}
        return [row for row in rows if row.request_id in new]


def open_store(url: str) -> Store | None:
    """``sqlite:///relative/path``, ``sqlite:////absolute/path``, ``postgresql://...``, or
    ``none`` (no ledger: None)."""
    if url.strip().lower() in ("", "none"):
        return None
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///").split("?", 1)[0]
        if not path or path == ":memory:":
            raise LedgerError(f"usage store {url!r}: give the database file's path (sqlite:///path)")
        return SqliteStore(path)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url)
    scheme = url.partition("://")[0] if "://" in url else "(no scheme)"  # the rest may hold a password
    raise LedgerError(f"usage store with scheme {scheme!r}: expected sqlite:///path, postgresql://... or none")
