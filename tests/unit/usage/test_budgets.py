"""Budgets rebuilt from the ledger's rollups, into the process's counters and into a real
Redis that is flushed: lifted to what was charged, never lowered, once per emptying."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from hermes_serve.auth import Principal
from hermes_serve.config import ApiKey
from hermes_serve.ledger import Ledger, MemoryLedger, RedisLedger
from hermes_serve.limits import Limits
from hermes_serve.usage import budgets
from hermes_serve.usage.reports import Spent, spent
from hermes_serve.usage.store import SqliteStore, Store
from tests.support.usage import DAY0, T0, row

NOW = T0 + 3600
YESTERDAY = DAY0 - 3600
DAILY = Principal.of(
    ApiKey(name="app", sha256="a" * 64, tokens_per_day=1000, requests_per_day=50, tokens_per_month=5000)
)
MINUTE_ONLY = Principal.of(ApiKey(name="minute", sha256="b" * 64, requests_per_minute=5))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    found = SqliteStore(tmp_path / "usage.db")
    found.write(
        [
            row(1, admitted=True),  # today: 10 + 5 tokens
            row(2, admitted=True, input_tokens=100, output_tokens=50),
            row(3, status=429, outcome="rate_limit_exceeded", input_tokens=0, output_tokens=0),  # not let in
            row(4, at=YESTERDAY, admitted=True, input_tokens=1000, output_tokens=0),  # this month only
            row(5, key="minute", admitted=True),
        ]
    )
    return found


def test_what_a_key_was_charged_is_read_per_day_and_month(store: Store) -> None:
    assert spent(store, NOW) == {
        "app": Spent(day_requests=2, day_tokens=165, month_requests=3, month_tokens=1165),
        "minute": Spent(1, 15, 1, 15),
    }
    assert spent(store, NOW, ["minute"]) == {"minute": Spent(1, 15, 1, 15)}
    assert spent(store, NOW, []) == {}


async def used(ledger: Ledger, principal: Principal) -> dict[str, int]:
    limits = Limits(ledger, 60, wall_clock=lambda: NOW)
    return {s.window.setting: s.used for s in await limits.standing(principal)}


async def test_a_new_process_counts_what_the_ledger_says_was_charged(store: Store) -> None:
    ledger = MemoryLedger()
    assert not await ledger.restored()
    assert await budgets.check(ledger, store, [DAILY, MINUTE_ONLY], NOW)
    assert await ledger.restored()
    assert await used(ledger, DAILY) == {"requests_per_day": 2, "tokens_per_day": 165, "tokens_per_month": 1165}
    assert await used(ledger, MINUTE_ONLY) == {"requests_per_minute": 0}  # minutes are not budgets


async def test_counts_are_lifted_never_lowered(store: Store) -> None:
    ledger = MemoryLedger()
    limits = Limits(ledger, 60, wall_clock=lambda: NOW)
    await limits.settle(await limits.admit(DAILY, 10), 900)  # counted here, not yet in the ledger
    await budgets.restore(ledger, store, [DAILY], NOW)
    assert await used(ledger, DAILY) == {"requests_per_day": 2, "tokens_per_day": 900, "tokens_per_month": 1165}


async def test_a_flushed_redis_is_rebuilt_once(store: Store, redis_url: str) -> None:
    ledger = RedisLedger(redis_url)
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    flushed: list[bool] = []

    async def flush() -> None:  # the writer's queue goes in first
        flushed.append(True)

    assert await budgets.check(ledger, store, [DAILY], NOW, flush)
    assert flushed == [True]
    assert await used(ledger, DAILY) == {"requests_per_day": 2, "tokens_per_day": 165, "tokens_per_month": 1165}
    assert await budgets.check(ledger, store, [DAILY], NOW, flush) and flushed == [True]  # nothing to do
    client.flushall()
    assert await used(ledger, DAILY) == {"requests_per_day": 0, "tokens_per_day": 0, "tokens_per_month": 0}
    assert await budgets.check(ledger, store, [DAILY], NOW, flush) and flushed == [True, True]
    assert await used(ledger, DAILY) == {"requests_per_day": 2, "tokens_per_day": 165, "tokens_per_month": 1165}
    await ledger.close()
    client.close()


async def test_a_store_that_does_not_answer_is_tried_again(tmp_path: Path) -> None:
    ledger = MemoryLedger()
    broken = SqliteStore(tmp_path / "missing" / "usage.db")
    broken.query = lambda *args: (_ for _ in ()).throw(OSError("down"))  # type: ignore[method-assign]
    assert not await budgets.check(ledger, broken, [DAILY], NOW)
    assert not await ledger.restored()
