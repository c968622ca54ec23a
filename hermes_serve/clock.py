"""Time, injected everywhere so tests control it. Two clocks, for two different questions:

- ``Clock``: how long something takes, on the running event loop's monotonic scale
  (``loop_time``). asyncio's timeouts read that same clock, so the deadlines of the queue and
  of a request and the durations measured against them (queue wait, slot hold times, the
  engine's restarts) never drift apart; tests move it with virtual time (looptime) and every
  deadline follows exactly. Another ``Clock`` changes what is measured, never when a
  deadline fires.
- ``WallClock``: seconds since the epoch (UTC), for what a calendar decides and replicas must
  agree on: key expiry, the rolling minutes of rate limits, day and month budgets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

Clock = Callable[[], float]
"""Monotonic seconds on the running event loop's scale."""

WallClock = Callable[[], float]
"""Seconds since the epoch, UTC."""


def loop_time() -> float:
    return asyncio.get_running_loop().time()


wall_time: WallClock = time.time
