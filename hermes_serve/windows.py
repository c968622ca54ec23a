"""The windows a key's limits and budgets are counted in: pure arithmetic on counters.

- **Per minute: rolling** (a sliding-window counter, the algorithm of the ``limits``
  library's ``SlidingWindowCounterRateLimiter``): two counters, this minute's and the last's,
  the last one weighted by how much of it still overlaps the rolling minute. Two numbers per
  key and window, whatever the volume: no entry per request or per token.
- **Per day and per month: calendar, UTC.** A budget someone is held to ("2 M tokens a
  day") resets at a time they can read and plan for, as billing periods do; a rolling month
  would free tokens a few at a time, at moments nobody can predict. One counter per period.

Everything takes the time as an argument (wall-clock seconds, UTC), so tests are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

Unit = Literal["requests", "tokens"]
Span = Literal["minute", "day", "month"]
MINUTE_S = 60.0


@dataclass(frozen=True)
class Window:
    setting: str
    """The key setting it comes from: ``tokens_per_day``..."""
    unit: Unit
    span: Span
    limit: int

    @property
    def is_budget(self) -> bool:
        """Day and month windows are budgets (``insufficient_quota``), minutes are rate limits."""
        return self.span != "minute"


@dataclass(frozen=True)
class Slots:
    """Where a window's counts live at one moment, and how they combine."""

    current: str
    previous: str | None
    previous_weight: float
    """How much of the previous minute still counts (0 for calendar windows)."""
    ttl_s: int
    """How long the current counter must be kept."""
    resets_at: float
    """When the current period ends (minutes: when the current minute ends)."""


def slots(window: Window, now: float) -> Slots:
    if window.span == "minute":
        index = math.floor(now / MINUTE_S)
        elapsed = now - index * MINUTE_S
        return Slots(
            current=f"m{index}",
            previous=f"m{index - 1}",
            previous_weight=(MINUTE_S - elapsed) / MINUTE_S,
            ttl_s=int(2 * MINUTE_S) + 1,
            resets_at=(index + 1) * MINUTE_S,
        )
    start = datetime.fromtimestamp(now, UTC)
    if window.span == "day":
        period = start.strftime("d%Y%m%d")
        end = datetime(start.year, start.month, start.day, tzinfo=UTC) + timedelta(days=1)
    else:
        period = start.strftime("M%Y%m")
        end = datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=UTC)
    # Kept a day past its end, so the usage view can still show a period that just ended.
    return Slots(period, None, 0.0, math.ceil(end.timestamp() - now) + 86400, end.timestamp())


def used(slot: Slots, current: int, previous: int) -> float:
    return previous * slot.previous_weight + current


def seconds_until_fits(window: Window, slot: Slots, now: float, current: int, previous: int, cost: int) -> float:
    """How long until ``cost`` more fits in ``window`` if nothing else is charged: the
    previous minute's weight decays linearly, then this minute becomes the previous one."""
    room = window.limit - cost
    if room < 0:
        return math.inf
    if used(slot, current, previous) <= room:
        return 0.0
    until_end = slot.resets_at - now
    if slot.previous is None:
        return until_end  # calendar: everything frees when the period ends
    if previous > 0:
        # previous * (weight - dt / 60) + current <= room
        dt = (used(slot, current, previous) - room) * MINUTE_S / previous
        if dt <= until_end:
            return dt
    # After the minute turns, this minute's count decays: current * (1 - x / 60) <= room.
    return until_end + (MINUTE_S * (1 - room / current) if current > room else 0.0)
