from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from hermes_serve.windows import Window, seconds_until_fits, slots, used


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


MINUTE = Window("tokens_per_minute", "tokens", "minute", 100)


def test_a_minute_counts_the_last_one_by_its_overlap() -> None:
    slot = slots(MINUTE, at("2026-11-28T10:00:15"))
    assert slot.previous_weight == 0.75 and slot.resets_at == at("2026-11-28T10:01:00")
    assert slot.current != slot.previous and slot.previous is not None
    assert used(slot, current=10, previous=40) == 40
    assert slots(MINUTE, at("2026-11-28T10:00:59")).current == slot.current


@pytest.mark.parametrize(
    ("span", "now", "resets"),
    [
        ("day", "2026-11-28T23:59:59", "2026-11-29T00:00:00"),
        ("day", "2026-12-31T00:00:00", "2027-01-01T00:00:00"),
        ("month", "2026-11-28T12:00:00", "2026-12-01T00:00:00"),
        ("month", "2026-12-15T00:00:00", "2027-01-01T00:00:00"),
        ("month", "2027-02-28T23:00:00", "2027-03-01T00:00:00"),
    ],
)
def test_calendar_periods_end_at_utc_midnight(span: str, now: str, resets: str) -> None:
    slot = slots(Window("tokens_per_x", "tokens", span, 10), at(now))  # type: ignore[arg-type]
    assert slot.previous is None and slot.previous_weight == 0
    assert slot.resets_at == at(resets)
    assert slot.ttl_s >= slot.resets_at - at(now)  # kept at least until the period ends


def test_periods_differ_across_a_boundary() -> None:
    day = Window("tokens_per_day", "tokens", "day", 10)
    assert slots(day, at("2026-11-28T23:59:59")).current != slots(day, at("2026-11-29T00:00:00")).current


@pytest.mark.parametrize(
    ("second", "current", "previous", "cost", "expected"),
    [
        (0, 0, 0, 10, 0.0),  # fits now
        (0, 50, 80, 10, 30.0),  # the previous minute decays: 80 x (1 - t/60) + 50 <= 90
        (30, 100, 0, 10, 30 + 6.0),  # the minute turns, then 100 x (1 - x/60) <= 90
        (0, 0, 0, 101, math.inf),  # never
    ],
)
def test_seconds_until_fits(second: int, current: int, previous: int, cost: int, expected: float) -> None:
    now = at("2026-11-28T10:00:00") + second
    wait = seconds_until_fits(MINUTE, slots(MINUTE, now), now, current, previous, cost)
    assert wait == pytest.approx(expected)
    if 0 < wait < math.inf:
        later = now + wait + 1e-6
        slot = slots(MINUTE, later)
        shifted = (current, previous) if slot.current == slots(MINUTE, now).current else (0, current)
        assert used(slot, *shifted) + cost <= MINUTE.limit + 1e-6


def test_a_budget_frees_when_its_period_ends() -> None:
    day = Window("tokens_per_day", "tokens", "day", 100)
    now = at("2026-11-28T22:00:00")
    assert seconds_until_fits(day, slots(day, now), now, 95, 0, 10) == 7200
