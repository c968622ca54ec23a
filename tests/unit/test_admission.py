from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter

import pytest

from hermes_serve.admission import AdmissionQueue, AdmissionStats, FairQueue, Waiter
from hermes_serve.errors import OpenAIError
from tests.support.virtual import elapse, until


def drain(queue: FairQueue) -> list[str]:
    order = []
    while (w := queue.pop_next(lambda _: True)) is not None:
        order.append(f"{w.key}{w.priority}")
    return order


def test_round_robin_across_keys_fifo_within_a_key() -> None:
    queue = FairQueue()
    waiters = [Waiter("a", 0, None) for _ in range(3)] + [Waiter("b", 0, None)]
    for w in waiters:
        queue.push(w)
    popped = [queue.pop_next(lambda _: True) for _ in range(4)]
    assert popped == [waiters[0], waiters[3], waiters[1], waiters[2]]
    assert queue.pop_next(lambda _: True) is None and len(queue) == 0


def test_higher_priority_first() -> None:
    queue = FairQueue()
    for key, priority in [("a", 0), ("b", 0), ("c", 5), ("a", 1)]:
        queue.push(Waiter(key, priority, None))
    assert drain(queue) == ["c5", "a1", "a0", "b0"]


def test_keys_that_may_not_run_are_skipped_not_dropped() -> None:
    queue = FairQueue()
    for key in "aab":
        queue.push(Waiter(key, 0, None))
    assert queue.pop_next(lambda w: w.key != "a").key == "b"  # type: ignore[union-attr]
    assert queue.waiting_by_key() == {"a": 2}


def test_remove() -> None:
    queue = FairQueue()
    first, second = Waiter("a", 0, None), Waiter("a", 0, None)
    queue.push(first)
    queue.push(second)
    assert queue.remove(first) and not queue.remove(first)
    assert queue.pop_next(lambda _: True) is second


async def hold(queue: AdmissionQueue, key: str, release: asyncio.Event, log: list[str], **kw: object) -> None:
    async with queue.slot(key, **kw):  # type: ignore[arg-type]
        log.append(key)
        await release.wait()


async def logged(log: list[str], count: int) -> None:
    """Until ``count`` holders have had their slot."""
    await until(lambda: len(log) == count)


async def test_cap_is_respected_and_slots_are_handed_on_in_fair_order() -> None:
    queue = AdmissionQueue(max_concurrency=1, max_queue=10)
    log: list[str] = []
    gates = {name: asyncio.Event() for name in ["a1", "a2", "a3", "b1", "first"]}
    first = asyncio.create_task(hold(queue, "first", gates["first"], log))
    await logged(log, 1)
    tasks = [asyncio.create_task(hold(queue, name[0], gates[name], log)) for name in ["a1", "a2", "a3", "b1"]]
    await until(lambda: queue.stats().waiting == 4)
    assert queue.stats().running == 1
    gates["first"].set()
    for holders, gate in enumerate(["a1", "b1", "a2", "a3"], start=2):
        await logged(log, holders)
        gates[gate].set()
    await asyncio.gather(first, *tasks)
    assert log == ["first", "a", "b", "a", "a"]
    assert queue.stats().running == 0 and queue.stats().waiting == 0


async def test_queue_full_is_503_with_retry_after() -> None:
    queue = AdmissionQueue(max_concurrency=1, max_queue=1)
    release = asyncio.Event()
    running = asyncio.create_task(hold(queue, "a", release, []))
    queued = asyncio.create_task(hold(queue, "a", release, []))
    await until(lambda: queue.stats().waiting == 1)
    with pytest.raises(OpenAIError) as refused:
        async with queue.slot("b"):
            pass
    assert refused.value.status == 503 and refused.value.code == "server_overloaded"
    assert int(refused.value.headers["Retry-After"]) >= 1
    release.set()
    await asyncio.gather(running, queued)


async def test_waiting_too_long_is_504_and_leaves_the_queue() -> None:
    queue = AdmissionQueue(max_concurrency=1, max_queue=5)
    release = asyncio.Event()
    running = asyncio.create_task(hold(queue, "a", release, []))
    await until(lambda: queue.stats().running == 1)
    waited_from = asyncio.get_running_loop().time()
    with pytest.raises(OpenAIError) as timed_out:
        async with queue.slot("b", timeout_s=30):
            pass
    assert timed_out.value.status == 504 and timed_out.value.code == "queue_timeout"
    assert asyncio.get_running_loop().time() - waited_from == pytest.approx(30), "exactly its limit"
    assert "waited 30s" in timed_out.value.message
    assert queue.stats().waiting == 0
    release.set()
    await running


async def test_cancelled_waiter_frees_its_place_and_no_slot_leaks() -> None:
    queue = AdmissionQueue(max_concurrency=1, max_queue=1)
    release = asyncio.Event()
    log: list[str] = []
    running = asyncio.create_task(hold(queue, "a", release, log))
    await logged(log, 1)
    gone = asyncio.create_task(hold(queue, "gone", release, log))
    await until(lambda: queue.stats().waiting == 1)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    assert queue.stats().waiting == 0
    after = asyncio.create_task(hold(queue, "after", release, log))  # the queue place is free
    await until(lambda: queue.stats().waiting == 1)
    release.set()
    await asyncio.gather(running, after)
    assert log == ["a", "after"] and queue.stats().running == 0


async def test_per_key_cap_lets_other_keys_past() -> None:
    queue = AdmissionQueue(max_concurrency=3, max_queue=5)
    release = asyncio.Event()
    log: list[str] = []
    tasks = [asyncio.create_task(hold(queue, k, release, log, key_max_concurrency=1)) for k in "aab"]
    await logged(log, 2)
    assert log == ["a", "b"] and queue.stats().waiting_by_key == {"a": 1}
    release.set()
    await asyncio.gather(*tasks)
    assert log == ["a", "b", "a"]


async def test_slot_is_released_when_the_body_raises() -> None:
    queue = AdmissionQueue(max_concurrency=1, max_queue=0)
    with pytest.raises(RuntimeError):
        async with queue.slot("a"):
            raise RuntimeError("boom")
    async with queue.slot("a"):
        assert queue.stats().running == 1


async def test_retry_after_follows_observed_hold_times() -> None:
    now = [0.0]
    queue = AdmissionQueue(max_concurrency=1, max_queue=3, clock=lambda: now[0])
    for _ in range(20):
        async with queue.slot("a"):
            now[0] += 10.0
    assert queue.retry_after_s() == 10


@pytest.mark.parametrize("seed", range(40))
async def test_a_storm_of_arrivals_time_outs_and_cancellations_keeps_the_bounds(seed: int) -> None:
    """Whatever the interleaving (a time-out as a slot is granted, a cancellation at any
    instant) and whatever the weights (some heavier than a cap), no more than
    ``max_concurrency`` slots are held, nor more than a key's cap by that key, and nothing is
    left counted after."""
    rnd = random.Random(seed)
    cap = rnd.choice([1, 2, 3])
    queue = AdmissionQueue(max_concurrency=cap, max_queue=rnd.choice([1, 2, 5]))
    key_caps = {f"k{i}": rnd.choice([None, 1, 2]) for i in range(3)}
    holding = peak = 0
    by_key: Counter[str] = Counter()

    async def one(i: int) -> None:
        nonlocal holding, peak
        timeout_s = rnd.choice([0.001, 0.005, 0.01, 0.02])
        key, weight = f"k{i % 3}", rnd.choice([1, 1, 2, 4])
        key_cap = key_caps[key]
        # What the request holds: its weight, clamped to each cap (heavier, it runs alone).
        held, key_held = min(weight, cap), min(weight, key_cap or weight)
        with contextlib.suppress(OpenAIError):
            async with queue.slot(
                key, priority=rnd.choice([0, 0, 5]), key_max_concurrency=key_cap, timeout_s=timeout_s, weight=weight
            ):
                holding += held
                by_key[key] += key_held
                peak = max(peak, holding)
                assert key_cap is None or by_key[key] <= key_cap
                try:
                    await elapse(rnd.choice([0, 0.001, 0.005, 0.01]))
                finally:
                    holding -= held
                    by_key[key] -= key_held

    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    for i in range(200):
        tasks.append(asyncio.create_task(one(i)))
        if rnd.random() < 0.3:
            await elapse(rnd.choice([0, 0.001, 0.003]))
        if rnd.random() < 0.2:
            loop.call_later(rnd.choice([0, 0.001, 0.005, 0.01]), rnd.choice(tasks).cancel)
    await asyncio.gather(*tasks, return_exceptions=True)
    assert 1 <= peak <= cap
    stats = queue.stats()
    assert (stats.running, stats.waiting, holding) == (0, 0, 0)


# --- weights: a request holds a slot per sequence ----------------------------------------------


async def test_a_request_holds_a_slot_per_sequence() -> None:
    queue = AdmissionQueue(max_concurrency=4, max_queue=5)
    gates = {name: asyncio.Event() for name in ("three", "two", "one")}
    log: list[str] = []
    tasks = [
        asyncio.create_task(hold(queue, name, gates[name], log, weight=weight))
        for name, weight in [("three", 3), ("two", 2), ("one", 1)]
    ]
    await logged(log, 2)
    # "two" does not fit beside "three"; "one" does, and passes it (as a key at its cap is passed).
    assert log == ["three", "one"] and queue.stats().running == 4 and queue.stats().waiting_by_key == {"two": 1}
    gates["three"].set()
    await logged(log, 3)
    assert log == ["three", "one", "two"] and queue.stats().running == 3
    for gate in gates.values():
        gate.set()
    await asyncio.gather(*tasks)
    assert queue.stats() == AdmissionStats(0, 0, {})


async def test_a_request_heavier_than_the_cap_runs_alone_rather_than_never() -> None:
    queue = AdmissionQueue(max_concurrency=2, max_queue=5)
    gates = {name: asyncio.Event() for name in ("small", "heavy", "late")}
    log: list[str] = []
    small = asyncio.create_task(hold(queue, "small", gates["small"], log))
    await logged(log, 1)
    heavy = asyncio.create_task(hold(queue, "heavy", gates["heavy"], log, weight=5))
    await until(lambda: queue.stats().waiting == 1)
    assert log == ["small"]
    gates["small"].set()
    await logged(log, 2)
    assert log == ["small", "heavy"] and queue.stats().running == 2, "the whole cap, not 5"
    late = asyncio.create_task(hold(queue, "late", gates["late"], log))
    await until(lambda: queue.stats().waiting == 1)
    assert log == ["small", "heavy"], "nothing beside it"
    gates["heavy"].set()
    gates["late"].set()
    await asyncio.gather(small, heavy, late)
    assert log == ["small", "heavy", "late"] and queue.stats() == AdmissionStats(0, 0, {})


async def test_a_keys_cap_counts_its_sequences_and_a_request_heavier_than_it_runs_alone_in_its_key() -> None:
    queue = AdmissionQueue(max_concurrency=10, max_queue=5)
    gates = [asyncio.Event() for _ in range(4)]
    log: list[str] = []
    mine = {"key_max_concurrency": 4}
    first = asyncio.create_task(hold(queue, "a", gates[0], log, weight=3, **mine))
    second = asyncio.create_task(hold(queue, "a", gates[1], log, weight=2, **mine))
    other = asyncio.create_task(hold(queue, "b", gates[2], log, weight=2, **mine))
    await logged(log, 2)
    assert log == ["a", "b"] and queue.stats().waiting_by_key == {"a": 1} and queue.stats().running == 5
    heavy = asyncio.create_task(hold(queue, "a", gates[3], log, weight=6, **mine))
    gates[0].set()
    await logged(log, 3)
    assert log == ["a", "b", "a"] and queue.stats().waiting_by_key == {"a": 1}, "6 waits for its key to empty"
    gates[1].set()
    await logged(log, 4)
    # It holds its key's whole cap (4), and all its 6 sequences of the engine's 10.
    assert log == ["a", "b", "a", "a"] and queue.stats().running == 2 + 6
    for gate in gates:
        gate.set()
    await asyncio.gather(first, second, other, heavy)
    assert queue.stats() == AdmissionStats(0, 0, {})
