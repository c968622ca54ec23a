from __future__ import annotations

import types

import limits.aio.storage.memory as memory_storage
import pytest

from hermes_serve.auth import Principal
from hermes_serve.errors import OpenAIError
from hermes_serve.limits import RateLimits, openai_duration


class FakeTime:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    """The library stamps its memory windows with time.time(); both it and we read this clock."""
    fake = FakeTime()
    monkeypatch.setattr(memory_storage, "time", types.SimpleNamespace(time=fake.time))
    return fake


def limits(clock: FakeTime) -> RateLimits:
    return RateLimits("memory://", wall_clock=clock.time)


async def test_fourth_request_at_three_per_minute_is_refused_until_the_window_moves(clock: FakeTime) -> None:
    rl, key = limits(clock), Principal("app", requests_per_minute=3)
    for remaining in (2, 1, 0):
        reservation = await rl.admit(key, 10)
        assert reservation.headers()["x-ratelimit-remaining-requests"] == str(remaining)
        clock.now += 10
    with pytest.raises(OpenAIError) as refused:
        await rl.admit(key, 10)
    error = refused.value
    assert (error.status, error.code, error.type) == (429, "rate_limit_exceeded", "requests")
    assert error.headers["x-ratelimit-reset-requests"] == "30s"  # the first hit leaves at +60 s
    assert error.headers["Retry-After"] == "31"
    clock.now += 31
    await rl.admit(key, 10)


async def test_keys_have_separate_windows(clock: FakeTime) -> None:
    rl = limits(clock)
    await rl.admit(Principal("a", requests_per_minute=1), 1)
    await rl.admit(Principal("b", requests_per_minute=1), 1)
    with pytest.raises(OpenAIError):
        await rl.admit(Principal("a", requests_per_minute=1), 1)


async def test_reservations_of_running_requests_block_others(clock: FakeTime) -> None:
    rl, key = limits(clock), Principal("app", tokens_per_minute=1000)
    first = await rl.admit(key, 600)
    assert first.headers()["x-ratelimit-remaining-tokens"] == "400"
    with pytest.raises(OpenAIError) as refused:
        await rl.admit(key, 600)
    assert refused.value.type == "tokens" and int(refused.value.headers["Retry-After"]) >= 1
    await rl.settle(first, 100)  # used far less than reserved: the rest is free again
    second = await rl.admit(key, 600)
    assert second.headers()["x-ratelimit-remaining-tokens"] == str(1000 - 100 - 600)


async def test_settled_usage_stays_charged_for_a_minute(clock: FakeTime) -> None:
    rl, key = limits(clock), Principal("app", tokens_per_minute=1000)
    await rl.settle(await rl.admit(key, 900), 900)
    with pytest.raises(OpenAIError):
        await rl.admit(key, 200)
    clock.now += 61
    await rl.admit(key, 200)


async def test_usage_beyond_what_is_left_is_charged_up_to_the_limit(clock: FakeTime) -> None:
    rl, key = limits(clock), Principal("app", tokens_per_minute=100)
    await rl.settle(await rl.admit(key, 50), 500)
    with pytest.raises(OpenAIError):
        await rl.admit(key, 1)


async def test_a_request_larger_than_the_whole_budget_is_refused_outright(clock: FakeTime) -> None:
    with pytest.raises(OpenAIError) as refused:
        await limits(clock).admit(Principal("app", tokens_per_minute=100), 101)
    assert refused.value.status == 429 and "Retry-After" not in refused.value.headers


async def test_unlimited_keys_get_no_headers(clock: FakeTime) -> None:
    rl = limits(clock)
    reservation = await rl.admit(Principal("free"), 10**9)
    assert reservation.headers() == {}
    await rl.settle(reservation, 10**9)


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


async def test_two_processes_over_one_redis_share_budget_and_reservations(redis_url: str) -> None:
    """Two RateLimits over one Redis behave as two service replicas would."""
    first, second = RateLimits(redis_url), RateLimits(redis_url)
    key = Principal("shared-unit", requests_per_minute=3, tokens_per_minute=1000)
    held = await first.admit(key, 700)
    with pytest.raises(OpenAIError) as tokens:
        await second.admit(key, 400)  # the other replica's reservation counts
    assert tokens.value.type == "tokens"
    await first.settle(held, 50)
    await second.admit(key, 400)
    await first.admit(key, 1)
    with pytest.raises(OpenAIError) as requests:
        await second.admit(key, 1)
    assert requests.value.type == "requests" and requests.value.headers["x-ratelimit-remaining-requests"] == "0"
