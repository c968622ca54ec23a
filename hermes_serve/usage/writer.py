"""Writing the usage ledger without slowing a request or losing one.

``Writer.record(row)`` only queues the row; a background task writes batches at least once a
second, on worker threads. A row leaves memory only once it is committed, or appended (with
fsync) to a local JSON-lines spill file, both within a second of ``record``: a slow or absent
store sends rows to the spill file, which is replayed when the store answers again, at
start-up, and at ``close``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from prometheus_client import Counter, Gauge

from ..clock import Clock, WallClock, loop_time, wall_time
from .store import DAY, Store, UsageRow

logger = logging.getLogger("hermes_serve.usage")


class SpillFile:
    """Rows not yet in the store, as JSON lines, appended with fsync: what a replica killed
    outright leaves for its next start. ``offset`` is where the rows not yet replayed begin."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.pending = 0
        """Rows after ``offset`` (kept by the writer, not read from the file)."""

    def open(self) -> None:
        """Counts what an earlier process left; a line it was cut off in the middle of is
        closed, so the next append starts a line of its own."""
        if not self.path.exists():
            return
        lines, last = 0, b"\n"
        with open(self.path, "rb") as file:
            while chunk := file.read(1 << 20):
                lines, last = lines + chunk.count(b"\n"), chunk[-1:]
        if last != b"\n":
            self._append(b"\n")
            lines += 1
        self.pending = lines

    def append(self, rows: Sequence[UsageRow]) -> None:
        self._append("".join(row.to_json() + "\n" for row in rows).encode())

    def _append(self, data: bytes) -> None:
        created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if created:  # the file's name must survive a crash too
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    def read(self, offset: int, max_rows: int) -> tuple[list[UsageRow], int, int]:
        """Up to ``max_rows`` whole lines from ``offset``: (rows, offset after them, lines)."""
        rows: list[UsageRow] = []
        lines = 0
        with open(self.path, "rb") as file:
            file.seek(offset)
            while lines < max_rows:
                line = file.readline()
                if not line.endswith(b"\n"):  # end of file, or an append still being written
                    break
                offset += len(line)
                lines += 1
                if not line.strip():
                    continue
                try:
                    rows.append(UsageRow.from_json(line))
                except (ValueError, TypeError) as exc:  # a line cut short by a crash
                    logger.warning("usage spill file %s: skipped an unreadable line (%s)", self.path, exc)
        return rows, offset, lines

    def consumed(self) -> bool:
        """Whether everything appended has been replayed (then the file is emptied)."""
        if self.path.exists() and self.path.stat().st_size > self.offset:
            return False
        if self.path.exists():
            os.truncate(self.path, 0)
        self.offset = 0
        self.pending = 0
        return True


@dataclass
class LedgerCounters:
    """For metrics: what was written, what failed, what went to the spill file."""

    rows_written: int = 0
    rows_duplicate: int = 0
    """Rows the store already had (a replay): written before, not counted twice."""
    write_failures: int = 0
    rows_spilled: int = 0
    spill_failures: int = 0
    rows_pruned: int = 0


@dataclass
class _Job:
    """The one store write in flight: a batch from memory, or a chunk of the spill file."""

    rows: list[UsageRow]
    replay_to: int | None = None
    """For a chunk of the spill file: the offset after it."""
    replay_lines: int = 0
    spilled: bool = False
    """A batch that took too long, so it was also appended to the spill file."""


class Writer:
    """Queues rows as requests end and writes them in the background (see the module's notes).

    ``record`` is all a request does. ``start`` replays what an earlier process spilled;
    ``close`` (at SIGTERM) writes what is left within its deadline, spilling the rest.
    """

    def __init__(
        self,
        store: Store,
        spill_path: Path,
        *,
        retention_days: float = 90,
        flush_interval_s: float = 0.5,
        commit_within_s: float = 0.3,
        batch_rows: int = 5000,
        memory_rows: int = 10_000,
        retry_s: float = 2.0,
        prune_interval_s: float = 3600,
        clock: Clock = loop_time,
        wall_clock: WallClock = wall_time,
    ) -> None:
        if flush_interval_s + commit_within_s >= 1:
            raise ValueError("flush_interval_s + commit_within_s must stay under a second")
        if retention_days <= 0:
            raise ValueError("retention_days must be positive")
        self.store = store
        self.retention_days = retention_days
        self.flush_interval_s = flush_interval_s
        self.commit_within_s = commit_within_s
        self.batch_rows = batch_rows
        self.memory_rows = memory_rows
        self.retry_s = retry_s
        self.prune_interval_s = prune_interval_s
        self.counters = LedgerCounters()
        self._clock = clock
        self._wall = wall_clock
        self._spill = SpillFile(spill_path)
        self._queue: deque[UsageRow] = deque()
        self._job: _Job | None = None
        self._task: asyncio.Future[int] | None = None
        self._retry_at = 0.0
        self._down = False
        self._cycle_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._cycled = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._pruner: asyncio.Task[None] | None = None
        self._next_prune = 0.0
        self._closing = False
        self._closed = False

    @property
    def queue_depth(self) -> int:
        """Rows recorded and not yet known to be in the store (in memory or spilled)."""
        in_flight = len(self._job.rows) if self._job and self._job.replay_to is None and not self._job.spilled else 0
        return len(self._queue) + in_flight + self._spill.pending

    @property
    def spill_path(self) -> Path:
        return self._spill.path

    def record(self, row: UsageRow) -> None:
        """Queues a finished request's row: never blocks, never waits for the store. Rows
        recorded after ``close`` stay in memory: close after the last request has ended."""
        self._queue.append(row)
        if len(self._queue) >= self.memory_rows:
            self._wake.set()

    async def start(self) -> None:
        """Migrates the schema (a store that does not answer is retried later), takes up what
        an earlier process spilled, and starts writing."""
        try:
            await asyncio.to_thread(self._spill.open)
        except OSError as exc:  # rows still reach the store; only the fallback is missing
            self.counters.spill_failures += 1
            logger.error("usage ledger: cannot read %s (%s)", self._spill.path, exc)
        if self._spill.pending:
            logger.info("usage ledger: %d rows left in %s will be replayed", self._spill.pending, self._spill.path)
        try:
            await asyncio.to_thread(self.store.migrate)
        except Exception as exc:
            logger.warning("usage ledger: store not ready (%s); rows wait in %s", exc, self._spill.path)
        self._next_prune = self._clock()
        self._runner = asyncio.create_task(self._run(), name="usage-ledger")
        if self._spill.pending:
            self._wake.set()

    async def flush(self) -> bool:
        """Writes everything recorded so far, trying the store now even while it is backing off.
        True once all of it is in the store; False when the store failed (rows are spilled)."""
        failures = self.counters.write_failures
        while True:
            # Past one failure, the next pass only takes it in (and spills): no retrying in a loop.
            await self._cycle(force=self.counters.write_failures == failures)
            if self._task is not None:
                await asyncio.wait({self._task})
                continue
            return not self._queue and not self._spill.pending and self.counters.write_failures == failures

    async def wait_cycle(self) -> None:
        """Returns after the background writer's next pass."""
        await self._cycled.wait()

    async def prune(self) -> int:
        """Deletes ledger rows older than ``retention_days`` (rollups stay)."""
        before = self._wall() - self.retention_days * DAY
        deleted = await asyncio.to_thread(self.store.prune, before)
        self.counters.rows_pruned += deleted
        if deleted:
            logger.info("usage ledger: pruned %d rows older than %s days", deleted, self.retention_days)
        return deleted

    async def close(self, timeout_s: float = 5.0) -> bool:
        """Stops the writer and drains memory and the spill file into the store within
        ``timeout_s``; what the store does not take by then stays in the spill file for the
        next start. True when everything reached the store."""
        if self._closed:
            return not self.queue_depth
        self._closing = True
        self._wake.set()
        if self._runner is not None:
            await self._runner
        if self._pruner is not None:
            self._pruner.cancel()
        deadline = self._clock() + timeout_s
        failures = self.counters.write_failures
        while self._clock() < deadline:
            await self._cycle(force=self.counters.write_failures == failures)
            if self._task is None:
                break
            await asyncio.wait({self._task}, timeout=max(0.0, deadline - self._clock()))
        async with self._cycle_lock:
            job = self._job
            if job is not None and not job.spilled and job.replay_to is None:
                await self._spill_rows(job)  # a write still hanging: its rows go to disk as well
            if self._queue:
                await self._spill_queue()
        if self._task is None:
            await asyncio.to_thread(self.store.close)
        self._closed = True
        return not self._queue and not self._spill.pending and self._task is None

    async def _run(self) -> None:
        while not self._closing:
            try:
                async with asyncio.timeout(self.flush_interval_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if self._closing:
                return
            try:
                await self._cycle(force=False)
                self._maybe_prune()
            except Exception:
                logger.exception("usage ledger: writer pass failed")

    def _maybe_prune(self) -> None:
        if self._clock() < self._next_prune or (self._pruner is not None and not self._pruner.done()):
            return
        self._next_prune = self._clock() + self.prune_interval_s

        async def prune() -> None:
            try:
                await self.prune()
            except Exception as exc:
                logger.warning("usage ledger: pruning failed (%s); retried in %ss", exc, self.prune_interval_s)

        self._pruner = asyncio.create_task(prune(), name="usage-ledger-prune")

    async def _cycle(self, force: bool) -> None:
        async with self._cycle_lock:
            await self._harvest()
            if not self._spill.pending and self._may_write(force):
                await self._write_queue()
            if self._queue:
                await self._spill_queue()
            if self._spill.pending and self._may_write(force):
                self._start_replay()
            self._cycled.set()
            self._cycled = asyncio.Event()

    def _may_write(self, force: bool) -> bool:
        return self._task is None and (force or self._clock() >= self._retry_at)

    async def _write_queue(self) -> None:
        deadline = self._clock() + self.commit_within_s
        while self._queue and self._task is None:
            count = min(self.batch_rows, len(self._queue))
            job = _Job([self._queue.popleft() for _ in range(count)])
            task = self._start(job, functools.partial(self.store.write, job.rows))
            done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - self._clock()))
            if not done:
                # Slow store: the batch goes to disk now, so a kill cannot lose it; the write
                # goes on, and the replay finds its rows there already.
                await self._spill_rows(job)
                return
            if not await self._harvest():
                return

    def _start_replay(self) -> None:
        job = _Job([], replay_to=self._spill.offset)

        def replay() -> int:
            job.rows, job.replay_to, job.replay_lines = self._spill.read(self._spill.offset, self.batch_rows)
            return self.store.write(job.rows)

        self._start(job, replay)

    def _start(self, job: _Job, write: Callable[[], int]) -> asyncio.Future[int]:
        self._job = job
        self._task = asyncio.ensure_future(asyncio.to_thread(write))
        self._task.add_done_callback(lambda _: self._wake.set())
        return self._task

    async def _harvest(self) -> bool:
        """Takes in the store write that ended, if one did; False if it failed."""
        task, job = self._task, self._job
        if task is None or job is None or not task.done():
            return True
        self._task = self._job = None
        try:
            inserted = task.result()
        except Exception as exc:
            self.counters.write_failures += 1
            self._retry_at = self._clock() + self.retry_s
            if not self._down:
                logger.warning("usage ledger: store write failed (%s); rows go to %s", exc, self._spill.path)
            self._down = True
            if job.replay_to is None and not job.spilled:
                self._queue.extendleft(reversed(job.rows))
            return False
        if self._down:
            logger.info("usage ledger: store answers again")
        self._down = False
        self._retry_at = 0.0
        self.counters.rows_written += inserted
        self.counters.rows_duplicate += len(job.rows) - inserted
        if job.replay_to is not None:
            self._spill.offset = job.replay_to
            self._spill.pending = max(0, self._spill.pending - job.replay_lines)
            await asyncio.to_thread(self._spill.consumed)
        return True

    async def _spill_rows(self, job: _Job) -> None:
        try:
            await asyncio.to_thread(self._spill.append, job.rows)
        except OSError as exc:
            self.counters.spill_failures += 1
            logger.error("usage ledger: cannot append to %s (%s); rows stay in memory", self._spill.path, exc)
            return
        job.spilled = True
        self._spill.pending += len(job.rows)
        self.counters.rows_spilled += len(job.rows)

    async def _spill_queue(self) -> None:
        rows = list(self._queue)
        self._queue.clear()
        try:
            await asyncio.to_thread(self._spill.append, rows)
        except OSError as exc:
            self._queue.extendleft(reversed(rows))
            self.counters.spill_failures += 1
            logger.error("usage ledger: cannot append to %s (%s); rows stay in memory", self._spill.path, exc)
            return
        self._spill.pending += len(rows)
        self.counters.rows_spilled += len(rows)


async def report(
    writer: Writer, queue: Gauge, written: Counter, failures: Counter, spilled: Counter, interval_s: float = 1.0
) -> None:
    """Keeps the writer's metrics current (BentoML's multiprocess metrics take no callbacks)."""
    last = LedgerCounters()
    while True:
        now = replace(writer.counters)
        written.inc(now.rows_written - last.rows_written)
        failures.inc(now.write_failures - last.write_failures)
        spilled.inc(now.rows_spilled - last.rows_spilled)
        queue.set(writer.queue_depth)
        last = now
        await asyncio.sleep(interval_s)
