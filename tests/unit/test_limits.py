"""Limits and budgets with a test clock, each case against both stores: memory and a real Redis."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from hermes_serve.auth import Principal
from hermes_serve.config import ApiKey
from hermes_serve.errors import OpenAIError
from hermes_serve.ledger import Ledger, MemoryLedger, RedisLedger
from hermes_serve.limits import HOLD_MARGIN_S, Limits, openai_duration
from tests.support.redis import RedisServer

REQUEST_TIMEOUT_S = 30
HOLD_S = REQUEST_TIMEOUT_S + HOLD_MARGIN_S
MINUTE_START = 60 * 29_000_000.0  # 2025-02-20T05:20:00Z, the start of a minute


class Clock:
    def __init__(self, now: float = MINUTE_START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def key(**settings: Any) -> Principal:
    """A key with ``settings``, named uniquely: the Redis of the test session is shared."""
    return Principal.of(ApiKey(name=f"k-{secrets.token_hex(4)}", sha256="0" * 64, **settings))


# A real Redis answers in real time (tests/unit/conftest.py): its cases keep the loop's real clock.
@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.looptime(False))])
async def ledger(request: pytest.FixtureRequest) -> AsyncIterator[Ledger]:
    if request.param == "memory":
        yield MemoryLedger()
        return
    store = RedisLedger(request.getfixturevalue("redis_url"))
    yield store
    await store.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limits(ledger: Ledger, clock: Clock) -> Limits:
    return Limits(ledger, REQUEST_TIMEOUT_S, wall_clock=clock)


async def refused(limits: Limits, principal: Principal, tokens: int) -> OpenAIError:
    with pytest.raises(OpenAIError) as refusal:
        await limits.admit(principal, tokens)
    assert refusal.value.status == 429
    return refusal.value


async def test_fourth_request_at_three_per_minute_is_refused_until_the_rolling_minute_frees(
    limits: Limits, clock: Clock
) -> None:
    app = key(requests_per_minute=3)
    for remaining in (2, 1, 0):
        reservation = await limits.admit(app, 10)
        assert reservation.headers["x-ratelimit-remaining-requests"] == str(remaining)
        clock.now += 10
    error = await refused(limits, app, 10)
    assert (error.code, error.type) == ("rate_limit_exceeded", "requests")
    # At +30 s: 30 s until the minute turns, then 3 x (1 - x/60) <= 2 after x = 20 s.
    assert error.headers["Retry-After"] == "51"
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    clock.now += 49
    await refused(limits, app, 10)
    clock.now += 2  # a client that waited exactly Retry-After
    await limits.admit(app, 10)


async def test_keys_have_separate_windows(limits: Limits) -> None:
    a, b = key(requests_per_minute=1), key(requests_per_minute=1)
    await limits.admit(a, 1)
    await limits.admit(b, 1)
    await refused(limits, a, 1)


async def test_reservations_of_running_requests_block_others(limits: Limits) -> None:
    app = key(tokens_per_minute=1000)
    first = await limits.admit(app, 600)
    assert first.headers["x-ratelimit-remaining-tokens"] == "400"
    error = await refused(limits, app, 600)
    assert error.type == "tokens" and int(error.headers["Retry-After"]) >= 1
    await limits.settle(first, 100)  # used far less than reserved: the rest is free again
    second = await limits.admit(app, 600)
    assert second.headers["x-ratelimit-remaining-tokens"] == str(1000 - 100 - 600)


async def test_settled_usage_counts_for_the_rolling_minute(limits: Limits, clock: Clock) -> None:
    app = key(tokens_per_minute=1000)
    await limits.settle(await limits.admit(app, 900), 900)
    clock.now += 1
    error = await refused(limits, app, 200)
    # 59 s to the next minute, then 900 x (1 - x/60) <= 800 after 6.7 s.
    assert error.headers["Retry-After"] == "66"
    clock.now += 65
    await refused(limits, app, 200)
    clock.now += 1
    await limits.admit(app, 200)


async def test_all_usage_is_charged_even_beyond_what_was_left(limits: Limits) -> None:
    app = key(tokens_per_minute=100)
    await limits.settle(await limits.admit(app, 50), 500)
    await refused(limits, app, 1)
    (standing,) = await limits.standing(app)
    assert standing.used == 500 and standing.remaining == 0


@pytest.mark.parametrize(
    ("setting", "code"), [("tokens_per_minute", "rate_limit_exceeded"), ("tokens_per_day", "insufficient_quota")]
)
async def test_a_request_larger_than_the_whole_limit_is_refused_outright(
    limits: Limits, setting: str, code: str
) -> None:
    error = await refused(limits, key(**{setting: 100}), 101)
    assert error.code == code and setting in error.message
    assert "Retry-After" not in error.headers, "waiting would not help"
    assert error.headers["x-should-retry"] == "false"


async def test_unlimited_keys_get_no_headers_and_cost_nothing(limits: Limits) -> None:
    reservation = await limits.admit(key(), 10**9)
    assert reservation.headers == {} and reservation.hold is None
    await limits.settle(reservation, 10**9)


async def test_a_day_budget_refuses_with_insufficient_quota_and_frees_at_midnight_utc(
    limits: Limits, clock: Clock
) -> None:
    clock.now = at("2026-11-28T23:00:00")
    app = key(tokens_per_day=1000)
    await limits.settle(await limits.admit(app, 900), 900)
    error = await refused(limits, app, 200)
    assert (error.code, error.type) == ("insufficient_quota", "insufficient_quota")
    assert "tokens_per_day" in error.message and "2026-11-29T00:00:00Z" in error.message
    assert error.headers["Retry-After"] == "3600" and error.headers["x-should-retry"] == "false"
    clock.now = at("2026-11-28T23:59:59")
    await refused(limits, app, 200)
    clock.now = at("2026-11-29T00:00:00")
    await limits.admit(app, 200)


async def test_requests_per_day(limits: Limits, clock: Clock) -> None:
    clock.now = at("2026-11-28T12:00:00")
    app = key(requests_per_day=2)
    await limits.admit(app, 1)
    await limits.admit(app, 1)
    assert (await refused(limits, app, 1)).code == "insufficient_quota"
    clock.now = at("2026-11-29T00:00:01")
    await limits.admit(app, 1)


async def test_a_month_budget_and_a_minute_limit_act_together(limits: Limits, clock: Clock) -> None:
    clock.now = at("2026-11-30T23:50:00")
    app = key(tokens_per_minute=1000, tokens_per_month=2500)
    await limits.settle(await limits.admit(app, 900), 900)
    assert (await refused(limits, app, 200)).code == "rate_limit_exceeded"  # the minute binds first
    for _ in range(2):  # two more quiet minutes later, 900 each: 2700 > 2500 is refused before
        clock.now += 120
        if _ == 0:
            await limits.settle(await limits.admit(app, 900), 900)
    month = await refused(limits, app, 900)
    assert month.code == "insufficient_quota" and "tokens_per_month" in month.message
    assert "2026-12-01T00:00:00Z" in month.message
    clock.now = at("2026-12-01T00:00:00")
    await limits.admit(app, 900)


async def test_each_reservation_expires_on_its_own(limits: Limits, clock: Clock) -> None:
    """A replica that dies leaves its reservations behind: they free when no request could
    still be running. Requests that are still running keep theirs."""
    app = key(tokens_per_minute=2000)
    dead = await limits.admit(app, 1200)  # its replica is killed: it never settles
    clock.now += HOLD_S - 5
    await refused(limits, app, 900)
    running = await limits.admit(app, 700)
    clock.now += 6  # the first is past any request's time limit: freed; the second is not
    (standing,) = await limits.standing(app)
    assert standing.reserved == 700
    await limits.admit(app, 1200)
    await refused(limits, app, 200)
    await limits.settle(dead, 0)  # a late settle of a freed reservation frees nothing twice
    (standing,) = await limits.standing(app)
    assert standing.reserved == 700 + 1200
    await limits.settle(running, 10)
    (standing,) = await limits.standing(app)
    assert standing.reserved == 1200 and standing.used == 10


async def test_standing_shows_each_window(limits: Limits, clock: Clock) -> None:
    clock.now = at("2026-11-28T10:00:30")
    app = key(requests_per_minute=10, tokens_per_minute=1000, tokens_per_day=5000)
    running = await limits.admit(app, 300)
    await limits.settle(await limits.admit(app, 200), 150)
    by_setting = {s.window.setting: s for s in await limits.standing(app)}
    assert (by_setting["requests_per_minute"].used, by_setting["requests_per_minute"].remaining) == (2, 8)
    tokens = by_setting["tokens_per_minute"]
    assert (tokens.used, tokens.reserved, tokens.remaining) == (150, 300, 550)
    day = by_setting["tokens_per_day"]
    assert (day.used, day.remaining, day.resets_at) == (150, 4550, at("2026-11-29T00:00:00"))
    await limits.settle(running, 0)


def test_openai_duration_format() -> None:
    assert [openai_duration(s) for s in (0.02, 1, 6, 59.2, 60, 65, 360)] == [
        "20ms",
        "1s",
        "6s",
        "1m0s",
        "1m0s",
        "1m5s",
        "6m0s",
    ]


async def test_two_replicas_over_one_redis_share_budget_and_reservations(redis_url: str) -> None:
    first, second = Limits(RedisLedger(redis_url), 30), Limits(RedisLedger(redis_url), 30)
    app = key(requests_per_minute=3, tokens_per_minute=1000, tokens_per_day=10_000)
    held = await first.admit(app, 700)
    tokens = await refused(second, app, 400)  # the other replica's reservation counts
    assert tokens.type == "tokens"
    await first.settle(held, 50)
    await second.admit(app, 400)
    await first.admit(app, 1)
    requests = await refused(second, app, 1)
    assert requests.type == "requests" and requests.headers["x-ratelimit-remaining-requests"] == "0"
    await first.close()
    await second.close()


async def test_one_redis_round_trip_per_admit_and_per_settle(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = RedisLedger(redis_url)
    limits = Limits(ledger, 30)
    app = key(
        requests_per_minute=100,
        tokens_per_minute=10**6,
        requests_per_day=10**4,
        tokens_per_day=10**7,
        tokens_per_month=10**8,
    )
    await limits.settle(await limits.admit(app, 10), 10)  # loads the scripts
    sent: list[str] = []
    client = ledger._redis
    execute = client.execute_command

    async def counted(*args: Any, **options: Any) -> Any:
        sent.append(str(args[0]))
        return await execute(*args, **options)

    monkeypatch.setattr(client, "execute_command", counted)
    reservation = await limits.admit(app, 500)
    assert sent == ["EVALSHA"]
    await limits.settle(reservation, 300)
    assert sent == ["EVALSHA", "EVALSHA"]
    await limits.close()


async def test_memory_keeps_three_minutes_of_counters_whatever_the_volume(clock: Clock) -> None:
    ledger = MemoryLedger()
    limits = Limits(ledger, 30, wall_clock=clock)
    app = key(requests_per_minute=10**6, tokens_per_minute=10**9)
    for _ in range(600):  # ten hours, a request a minute, a million tokens each
        await limits.settle(await limits.admit(app, 10**6), 10**6)
        clock.now += 60
    assert len(ledger._counters) <= 6  # per unit: this minute's, the last's, one expiring


# --- the shared storage lost and back ---------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path, redis_server: RedisServer) -> Iterator[RedisServer]:
    """A redis-server of this test's own, to stop and start (the session's is shared)."""
    server = RedisServer(redis_server.binary, tmp_path)
    server.start()
    yield server
    server.stop()


async def test_refuse_while_the_storage_is_down_and_count_everything_when_it_is_back(own_redis: RedisServer) -> None:
    states: list[bool] = []
    limits = Limits(RedisLedger(own_redis.url, timeout_s=0.5), 30, storage_state=states.append)
    app, free = key(tokens_per_minute=10_000), key()
    running = await limits.admit(app, 500)
    own_redis.stop()
    down = await refused_with(limits, app, 100, status=503)
    assert down.code == "limits_unavailable" and down.headers["Retry-After"] == "5"
    assert (await limits.admit(free, 100)).hold is None, "keys without limits do not need the storage"
    await limits.settle(running, 321)  # ends during the outage: kept, not lost
    assert limits.unsettled == 1 and states == [False]
    own_redis.start()  # empty: as after a restart without persistence
    await limits.admit(app, 100)
    assert states == [False, True] and limits.unsettled == 0
    (standing,) = await limits.standing(app)
    assert standing.used == 321 and standing.reserved == 100
    await limits.close()


async def test_allow_admits_uncounted_while_down_and_counts_it_after(own_redis: RedisServer) -> None:
    limits = Limits(RedisLedger(own_redis.url, timeout_s=0.5), 30, on_storage_failure="allow")
    app = key(tokens_per_minute=1_000)
    own_redis.stop()
    reservation = await limits.admit(app, 900)
    await limits.settle(reservation, 700)
    own_redis.start()
    await limits.admit(app, 10)
    (standing,) = await limits.standing(app)
    assert standing.used == 700
    await limits.close()


async def test_a_storage_slower_than_its_timeout_refuses_in_time(own_redis: RedisServer) -> None:
    limits = Limits(RedisLedger(own_redis.url, timeout_s=0.5), 30)
    app = key(requests_per_minute=10)
    await limits.admit(app, 1)  # connected
    # From its answer on, scripts wait (up to 60 s); CLIENT UNPAUSE, not a write, does not.
    # Refused means it did not wait: a script that waited out the pause would have admitted it.
    own_redis.command("CLIENT", "PAUSE", "60000", "WRITE")
    await refused_with(limits, app, 1, status=503)
    own_redis.command("CLIENT", "UNPAUSE")
    await limits.admit(app, 1)
    await limits.close()


async def refused_with(limits: Limits, principal: Principal, tokens: int, status: int) -> OpenAIError:
    with pytest.raises(OpenAIError) as refusal:
        await limits.admit(principal, tokens)
    assert refusal.value.status == status
    return refusal.value
