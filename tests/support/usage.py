"""What the usage ledger's tests share: rows, a backend (SQLite file or real Postgres) and reads
of what a store holds."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from hermes_serve.usage.store import (
    COLUMNS,
    SqliteStore,
    Store,
    UsageRow,
    open_store,
)
from hermes_serve.usage.writer import Writer as UsageLedger
from tests.support import fleet
from tests.support.servers import Server, wait_until

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


def schema_rows(store: Store) -> list[tuple[Any, ...]]:
    return [tuple(v) for v in store.query("SELECT version FROM usage_schema ORDER BY version")]


Ledgers = Callable[..., Awaitable[UsageLedger]]
"""Starts a writer over the test's store (the ``ledgers`` fixture)."""


# --- a running server's ledger --------------------------------------------------------------


def store_of(server: Server) -> Store:
    """The server's own ledger: the store its configuration names, or the SQLite file in its
    state directory."""
    assert server.config is not None
    section = yaml.safe_load(server.config.read_text())["services"]["hermes"]
    url = section.get("usage", {}).get("store")
    if not url:
        return SqliteStore(server.log.parent / "bentoml" / "hermes-serve" / "usage.db")
    found = open_store(url)
    assert found is not None
    return found


def rows(store: Store, ids: list[str]) -> dict[str, UsageRow]:
    if not ids:
        return {}
    try:
        found = store.query(
            f"SELECT {', '.join(COLUMNS)} FROM usage_requests WHERE request_id IN ({', '.join('?' * len(ids))})", ids
        )
    except Exception:  # no table yet, or the store stopped
        return {}
    return {values[0]: UsageRow.from_values(values) for values in found}


def arrived(store: Store, ids: list[str], timeout: float = 60) -> dict[str, UsageRow]:
    assert wait_until(lambda: len(rows(store, ids)) == len(set(ids)), timeout=timeout), (
        f"{len(set(ids)) - len(rows(store, ids))} of {len(set(ids))} rows missing"
    )
    return rows(store, ids)


# --- requests of each API, and the usage each reports --------------------------------------

SCRIPTED = fleet.SCRIPTED
PROMPT = "Count the apples. [[tokens=6]] [[cached=3]]"


def body(api: str, stream: bool) -> dict[str, Any]:
    if api == "messages":
        return {
            "model": SCRIPTED,
            "max_tokens": 20,
            "messages": [{"role": "user", "content": PROMPT}],
            "metadata": {"user_id": "person-m"},
            "stream": stream,
        }
    if api == "responses":
        return {"model": SCRIPTED, "input": PROMPT, "safety_identifier": "person-r", "stream": stream}
    usage = {"stream_options": {"include_usage": True}} if stream else {}
    if api == "completions":
        return {"model": SCRIPTED, "prompt": PROMPT, "max_tokens": 20, "user": "person-c", "stream": stream, **usage}
    return {
        "model": SCRIPTED,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 20,
        "user": "person-chat",
        "stream": stream,
        **usage,
    }


PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "responses": "/v1/responses"}
PATHS["messages"] = "/v1/messages"
END_USERS = {"chat": "person-chat", "completions": "person-c", "responses": "person-r", "messages": "person-m"}


def reported(api: str, answer: httpx.Response, stream: bool) -> tuple[int, int, int]:
    """(input, cached input, output) as the API reported them to the client."""
    if not stream:
        usage = answer.json()["usage"]
    else:
        events = [json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: {")]
        if api == "messages":
            start = next(e for e in events if e["type"] == "message_start")["message"]["usage"]
            delta = next(e for e in events if e["type"] == "message_delta")["usage"]
            usage = {**start, "output_tokens": delta["output_tokens"]}
        elif api == "responses":
            usage = next(e for e in events if e["type"] == "response.completed")["response"]["usage"]
        else:
            usage = next(e for e in events if e.get("usage"))["usage"]
    if api == "messages":
        cached = usage.get("cache_read_input_tokens", 0)
        return usage["input_tokens"] + cached, cached, usage["output_tokens"]
    if api == "responses":
        return usage["input_tokens"], usage["input_tokens_details"]["cached_tokens"], usage["output_tokens"]
    return usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"], usage["completion_tokens"]
