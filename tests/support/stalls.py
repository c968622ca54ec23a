"""When the test process stood still: time bounds in tests count only the time it ran.

A thread wakes every ``PERIOD_S``. Waking ``STALL_S`` or more late means nothing in this
process ran for that long: the machine was stopped (a virtual machine's host can pause it), or
the interpreter was held up. Meanwhile no request could be sent and no reply read, while the
servers' own clocks ran on. So a test that bounds how long something takes subtracts the
stalls (``running_since``), and a test whose verdict needs requests to meet within a short
window can tell a spoiled attempt from a wrong answer (``stalled``). The session's stalls are
listed at its end (tests/conftest.py), named by the test that was running.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

PERIOD_S = 0.05
STALL_S = 1.0


@dataclass(frozen=True)
class Stall:
    began: float
    """time.monotonic() when it began."""
    seconds: float
    test: str


class StallWatch:
    def __init__(self, period_s: float = PERIOD_S, stall_s: float = STALL_S) -> None:
        self._period_s = period_s
        self._stall_s = stall_s
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="stall-watch", daemon=True)
        self.stalls: list[Stall] = []
        self.test = ""
        """The test running now, named in the stalls seen during it."""

    def start(self) -> None:
        self._last = time.monotonic()
        self._thread.start()

    def stalled(self, since: float, until: float | None = None) -> float:
        """Seconds this process stood still between two ``time.monotonic()`` instants."""
        until = time.monotonic() if until is None else until
        stalls = list(self.stalls)
        pending = self._pending(until)  # one not yet seen by the watch: it may wake after us
        if pending is not None:
            stalls.append(pending)
        return sum(max(0.0, min(s.began + s.seconds, until) - max(s.began, since)) for s in stalls)

    def running_since(self, since: float) -> float:
        """Seconds since ``since`` that this process ran: elapsed time less its stalls."""
        now = time.monotonic()
        return now - since - self.stalled(since, now)

    def _pending(self, now: float) -> Stall | None:
        late = now - self._last - self._period_s
        return Stall(self._last + self._period_s, late, self.test) if late >= self._stall_s else None

    def _watch(self) -> None:
        while True:  # a daemon thread: it ends with the session's process
            time.sleep(self._period_s)
            now = time.monotonic()
            stall = self._pending(now)
            if stall is not None:
                self.stalls.append(stall)
            self._last = now


WATCH = StallWatch()
