"""A bounded, fair admission queue in front of the engine.

At most ``max_concurrency`` slots are held; up to ``max_queue`` requests wait. A request holds
one slot per sequence it asks the engine for (its ``weight``: ``n``), against the engine's cap
and its key's: ``n: 16`` weighs 16, not 1. One heavier than a cap holds the whole cap, so it
runs alone rather than never. Waiters are served by priority, then round-robin across keys
(FIFO within a key), skipping those that do not fit: one key flooding the queue cannot starve
another. The choice is a pure class (``FairQueue``); ``AdmissionQueue`` wires it to asyncio
futures.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from . import errors
from .clock import Clock, loop_time

RETRY_AFTER_MAX_S = 60


@dataclass(eq=False)
class Waiter:
    key: str
    priority: int
    key_cap: int | None
    weight: int = 1
    """The slots it asks for: its sequences."""
    granted: asyncio.Future[None] | None = field(default=None, repr=False)


class FairQueue:
    """Waiters by priority (high first), then round-robin over keys, FIFO within a key."""

    def __init__(self) -> None:
        self._levels: dict[int, OrderedDict[str, deque[Waiter]]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, waiter: Waiter) -> None:
        keys = self._levels.setdefault(waiter.priority, OrderedDict())
        keys.setdefault(waiter.key, deque()).append(waiter)
        self._size += 1

    def remove(self, waiter: Waiter) -> bool:
        keys: dict[str, deque[Waiter]] = self._levels.get(waiter.priority, {})
        line = keys.get(waiter.key)
        if line is None or waiter not in line:
            return False
        line.remove(waiter)
        self._drop_if_empty(waiter.priority, waiter.key)
        self._size -= 1
        return True

    def pop_next(self, may_run: Callable[[Waiter], bool]) -> Waiter | None:
        for priority in sorted(self._levels, reverse=True):
            keys = self._levels[priority]
            for key, line in list(keys.items()):
                if not may_run(line[0]):
                    continue
                waiter = line.popleft()
                keys.move_to_end(key)  # this key goes to the back of the round
                self._drop_if_empty(priority, key)
                self._size -= 1
                return waiter
        return None

    def remove_keys(self, keys: set[str]) -> list[Waiter]:
        """Take every waiter of ``keys`` out of the queue."""
        taken: list[Waiter] = []
        for priority, lines in list(self._levels.items()):
            for key in keys & lines.keys():
                taken += lines[key]
                self._size -= len(lines[key])
                lines[key].clear()
                self._drop_if_empty(priority, key)
        return taken

    def waiting_by_key(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for keys in self._levels.values():
            for key, line in keys.items():
                counts[key] += len(line)
        return dict(counts)

    def _drop_if_empty(self, priority: int, key: str) -> None:
        keys = self._levels[priority]
        if not keys[key]:
            del keys[key]
        if not keys:
            del self._levels[priority]


@dataclass(frozen=True)
class AdmissionStats:
    running: int
    """Slots held (sequences), not requests."""
    waiting: int
    waiting_by_key: dict[str, int]


class AdmissionQueue:
    def __init__(self, max_concurrency: int, max_queue: int, clock: Clock = loop_time) -> None:
        self._max_concurrency = max_concurrency
        self._max_queue = max_queue
        self._clock = clock
        self._queue = FairQueue()
        self._running = 0
        self._running_by_key: Counter[str] = Counter()
        self._mean_hold_s = 1.0  # moving average of slot hold time, for Retry-After

    @contextlib.asynccontextmanager
    async def slot(
        self,
        key: str,
        priority: int = 0,
        key_max_concurrency: int | None = None,
        timeout_s: float = 120,
        weight: int = 1,
    ) -> AsyncIterator[None]:
        waiter = Waiter(key, priority, key_max_concurrency, weight)
        await self._acquire(waiter, timeout_s)
        held_since = self._clock()
        try:
            yield
        finally:
            self._mean_hold_s = 0.8 * self._mean_hold_s + 0.2 * (self._clock() - held_since)
            self._release(waiter)

    def stats(self) -> AdmissionStats:
        return AdmissionStats(self._running, len(self._queue), self._queue.waiting_by_key())

    def refuse(self, keys: set[str], error: Exception) -> int:
        """Refuse the queued requests of ``keys`` (revoked while they waited); returns how many."""
        taken = self._queue.remove_keys(keys)
        for waiter in taken:
            if waiter.granted is not None and not waiter.granted.done():
                waiter.granted.set_exception(error)
        return len(taken)

    def retry_after_s(self) -> int:
        """About how long until a queue place frees: the queue's drain time, at least 1 s."""
        drain = self._mean_hold_s * (len(self._queue) + 1) / self._max_concurrency
        return max(1, min(RETRY_AFTER_MAX_S, math.ceil(drain)))

    def _holds(self, waiter: Waiter) -> tuple[int, int]:
        """The slots ``waiter`` holds of the engine and of its key: its weight, each clamped to
        the cap it counts against (heavier, it could never fit)."""
        engine = min(waiter.weight, self._max_concurrency)
        return engine, waiter.weight if waiter.key_cap is None else min(waiter.weight, waiter.key_cap)

    def _may_run(self, waiter: Waiter) -> bool:
        engine, key = self._holds(waiter)
        fits_key = waiter.key_cap is None or self._running_by_key[waiter.key] + key <= waiter.key_cap
        return self._running + engine <= self._max_concurrency and fits_key

    async def _acquire(self, waiter: Waiter, timeout_s: float) -> None:
        # Waiters are granted the moment a slot frees, so none that could run is still queued.
        if self._may_run(waiter):
            self._grant(waiter)
            return
        if len(self._queue) >= self._max_queue:
            raise errors.server_overloaded(self.retry_after_s())
        waiter.granted = asyncio.get_running_loop().create_future()
        self._queue.push(waiter)
        started = self._clock()
        try:
            await asyncio.wait_for(asyncio.shield(waiter.granted), timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            granted = waiter.granted.done() and not waiter.granted.cancelled() and waiter.granted.exception() is None
            if granted:
                self._release(waiter)  # granted at the last moment: hand it on
            else:
                self._queue.remove(waiter)
                waiter.granted.cancel()
            if isinstance(exc, asyncio.TimeoutError):
                raise errors.queue_timeout(self._clock() - started, self.retry_after_s()) from None
            raise

    def _grant(self, waiter: Waiter) -> None:
        engine, key = self._holds(waiter)
        self._running += engine
        self._running_by_key[waiter.key] += key
        if waiter.granted is not None:
            waiter.granted.set_result(None)

    def _release(self, waiter: Waiter) -> None:
        engine, key = self._holds(waiter)
        self._running -= engine
        self._running_by_key[waiter.key] -= key
        if not self._running_by_key[waiter.key]:
            del self._running_by_key[waiter.key]
        while (next_up := self._queue.pop_next(self._may_run)) is not None:
            self._grant(next_up)
