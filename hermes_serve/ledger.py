"""Where keys' counters and in-flight reservations live: in this process, or in Redis.

Two operations, each one atomic step (in Redis: one script call, one round trip):

- ``admit``: drop expired reservations, read every window a key has, and, only if the
  request fits all of them, count it in the request windows and hold its token estimate;
- ``settle``: release a reservation and count the tokens really used.

Each reservation expires on its own (``held_until``), so the reservations of requests that
died with a replica free themselves after ``request_timeout_s``, and those of requests still
running are never forgotten. The arithmetic of windows lives in ``windows``; both stores
apply it identically (the tests run one suite against both).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Protocol

from .windows import Slots, Window, slots

_ADMIT = """
local now, apply, n = tonumber(ARGV[1]), ARGV[5] == '1', tonumber(ARGV[6])
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(expired) do
  local held = redis.call('HGET', KEYS[2], id)
  if held then
    redis.call('DECRBY', KEYS[3], held)
    redis.call('HDEL', KEYS[2], id)
  end
end
if #expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) end
local reserved = math.max(0, tonumber(redis.call('GET', KEYS[3]) or '0'))
local result, refused = {0, reserved}, 0
for i = 1, n do
  local a = 6 + (i - 1) * 5
  local weight, limit, cost, tokens = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), ARGV[a + 4] == '1'
  local current = tonumber(redis.call('GET', KEYS[2 + 2 * i]) or '0')
  local previous = tonumber(redis.call('GET', KEYS[3 + 2 * i]) or '0')
  local used = previous * weight + current
  if tokens then used = used + reserved end
  if refused == 0 and used + cost > limit then refused = i end
  table.insert(result, current)
  table.insert(result, previous)
end
result[1] = refused
if refused > 0 or not apply then return result end
for i = 1, n do
  local a = 6 + (i - 1) * 5
  if ARGV[a + 4] == '0' then
    redis.call('INCRBY', KEYS[2 + 2 * i], ARGV[a + 3])
    redis.call('EXPIRE', KEYS[2 + 2 * i], ARGV[a + 5])
  end
end
local hold = tonumber(ARGV[3])
if hold > 0 then
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[2])
  redis.call('HSET', KEYS[2], ARGV[2], hold)
  redis.call('INCRBY', KEYS[3], hold)
  local ttl = math.ceil(tonumber(ARGV[4]) - now) + 60
  for k = 1, 3 do
    if redis.call('TTL', KEYS[k]) < ttl then redis.call('EXPIRE', KEYS[k], ttl) end
  end
end
return result
"""

_SETTLE = """
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held then
  redis.call('DECRBY', KEYS[3], held)
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[1])
end
local used = tonumber(ARGV[2])
if used > 0 then
  for i = 4, #KEYS do
    redis.call('INCRBY', KEYS[i], used)
    redis.call('EXPIRE', KEYS[i], ARGV[i - 1])
  end
end
return 0
"""

_RAISE = """
for i = 1, #KEYS do
  local floor = tonumber(ARGV[2 * i - 1])
  if floor > tonumber(redis.call('GET', KEYS[i]) or '0') then
    redis.call('SET', KEYS[i], floor, 'EX', ARGV[2 * i])
  end
end
return 0
"""
RESTORED = "hermes:budgets-restored"
"""Set once the budgets' counters were rebuilt from the usage ledger: gone with a flush."""


class StorageUnavailable(Exception):
    """The shared storage did not answer (down, unreachable, or slower than its timeout)."""


@dataclass(frozen=True)
class Hold:
    """A reservation: tokens held for a request until it settles, or until ``until``."""

    id: str
    tokens: int
    until: float


@dataclass(frozen=True)
class Count:
    """One window's counters at one moment."""

    window: Window
    slot: Slots
    current: int
    previous: int


@dataclass(frozen=True)
class Tally:
    """What ``admit`` (or a read) found: each window's counts before this request, the
    tokens already held by running requests, and the first window the request did not fit."""

    counts: list[Count]
    reserved: int
    refused: Window | None = None


@dataclass(frozen=True)
class Charge:
    window: Window
    cost: int


class Ledger(Protocol):
    async def admit(self, key: str, charges: list[Charge], hold: Hold | None, now: float) -> Tally: ...
    async def settle(self, key: str, hold_id: str, used_tokens: int, windows: list[Window], now: float) -> None: ...
    async def read(self, key: str, windows: list[Window], now: float) -> Tally: ...
    async def raise_to(self, key: str, floors: list[tuple[Window, int]], now: float) -> None:
        """Lifts each window's current count to at least its floor (a rebuilt budget)."""

    async def restored(self) -> bool:
        """Whether the budgets were rebuilt into this storage since it was last emptied."""

    async def mark_restored(self) -> None: ...
    async def close(self) -> None: ...


def _counter(key: str, window: Window, slot: str) -> str:
    # {key} is a Redis Cluster hash tag: one key's counters share a slot, as a script needs.
    return f"hermes:{{{key}}}:{window.unit}:{slot}"


def _held_keys(key: str) -> list[str]:
    return [f"hermes:{{{key}}}:held", f"hermes:{{{key}}}:held-tokens", f"hermes:{{{key}}}:held-total"]


class RedisLedger:
    def __init__(self, url: str, timeout_s: float = 2.0) -> None:
        import redis.asyncio as redis

        # Bounded waits: a Redis that is down or stalls refuses a request in timeout_s, never hangs it.
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._admit = self._redis.register_script(_ADMIT)
        self._settle = self._redis.register_script(_SETTLE)
        self._raise = self._redis.register_script(_RAISE)

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        from redis.exceptions import RedisError

        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise StorageUnavailable(f"{type(exc).__name__}: {exc}") from None

    async def admit(self, key: str, charges: list[Charge], hold: Hold | None, now: float) -> Tally:
        return await self._run(key, charges, hold, now, apply=True)

    async def read(self, key: str, windows: list[Window], now: float) -> Tally:
        return await self._run(key, [Charge(w, 0) for w in windows], None, now, apply=False)

    async def _run(self, key: str, charges: list[Charge], hold: Hold | None, now: float, apply: bool) -> Tally:
        keys = _held_keys(key)
        held: list[str | int | float] = [hold.id, hold.tokens, hold.until] if hold else ["", 0, 0]
        args = [now, *held, int(apply), len(charges)]
        spots = []
        for charge in charges:
            slot = slots(charge.window, now)
            spots.append(slot)
            current = _counter(key, charge.window, slot.current)
            keys += [current, _counter(key, charge.window, slot.previous) if slot.previous else current]
            tokens = charge.window.unit == "tokens"
            args += [slot.previous_weight, charge.window.limit, charge.cost, int(tokens), slot.ttl_s]
        result: list[Any] = await self._call(self._admit, keys, args)
        refused, reserved, values = int(result[0]), int(result[1]), [int(v) for v in result[2:]]
        counts = [
            Count(c.window, slot, values[2 * i], values[2 * i + 1] if slot.previous else 0)
            for i, (c, slot) in enumerate(zip(charges, spots, strict=True))
        ]
        return Tally(counts, reserved, charges[refused - 1].window if refused else None)

    async def settle(self, key: str, hold_id: str, used_tokens: int, windows: list[Window], now: float) -> None:
        token_slots = [(w, slots(w, now)) for w in windows if w.unit == "tokens"]
        keys = _held_keys(key) + [_counter(key, w, s.current) for w, s in token_slots]
        await self._call(self._settle, keys, [hold_id, used_tokens, *(s.ttl_s for _, s in token_slots)])

    async def raise_to(self, key: str, floors: list[tuple[Window, int]], now: float) -> None:
        keys, args = [], []
        for window, floor in floors:
            slot = slots(window, now)
            keys.append(_counter(key, window, slot.current))
            args += [floor, slot.ttl_s]
        if keys:
            await self._call(self._raise, keys, args)

    async def restored(self) -> bool:
        return bool(await self._command(self._redis.exists, RESTORED))

    async def mark_restored(self) -> None:
        await self._command(self._redis.set, RESTORED, 1)

    async def _command(self, command: Any, *args: Any) -> Any:
        from redis.exceptions import RedisError

        try:
            return await command(*args)
        except (RedisError, OSError) as exc:
            raise StorageUnavailable(f"{type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        await self._redis.aclose()


@dataclass
class MemoryLedger:
    """The same steps over dictionaries, for one process (``limits_storage: memory://``)."""

    _counters: dict[str, int] = field(default_factory=dict)
    _expiries: list[tuple[float, str]] = field(default_factory=list)
    _holds: dict[str, dict[str, Hold]] = field(default_factory=dict)
    _restored: bool = False

    async def admit(self, key: str, charges: list[Charge], hold: Hold | None, now: float) -> Tally:
        return self._run(key, charges, hold, now, apply=True)

    async def read(self, key: str, windows: list[Window], now: float) -> Tally:
        return self._run(key, [Charge(w, 0) for w in windows], None, now, apply=False)

    def _run(self, key: str, charges: list[Charge], hold: Hold | None, now: float, apply: bool) -> Tally:
        self._expire(now)
        held = self._holds.setdefault(key, {})
        for expired in [h for h in held.values() if h.until <= now]:
            del held[expired.id]
        reserved = sum(h.tokens for h in held.values())
        counts, refused = [], None
        for charge in charges:
            slot = slots(charge.window, now)
            current = self._counters.get(_counter(key, charge.window, slot.current), 0)
            previous = self._counters.get(_counter(key, charge.window, slot.previous), 0) if slot.previous else 0
            counts.append(Count(charge.window, slot, current, previous))
            used = previous * slot.previous_weight + current + (reserved if charge.window.unit == "tokens" else 0)
            if refused is None and used + charge.cost > charge.window.limit:
                refused = charge.window
        if refused is None and apply:
            for charge, count in zip(charges, counts, strict=True):
                if charge.window.unit == "requests":
                    self._add(_counter(key, charge.window, count.slot.current), charge.cost, now + count.slot.ttl_s)
            if hold is not None and hold.tokens > 0:
                held[hold.id] = hold
        if not held:
            del self._holds[key]
        return Tally(counts, reserved, refused)

    async def settle(self, key: str, hold_id: str, used_tokens: int, windows: list[Window], now: float) -> None:
        held = self._holds.get(key, {})
        held.pop(hold_id, None)
        if not held:
            self._holds.pop(key, None)
        if used_tokens > 0:
            for window in windows:
                if window.unit == "tokens":
                    slot = slots(window, now)
                    self._add(_counter(key, window, slot.current), used_tokens, now + slot.ttl_s)

    async def raise_to(self, key: str, floors: list[tuple[Window, int]], now: float) -> None:
        self._expire(now)
        for window, floor in floors:
            slot = slots(window, now)
            counter = _counter(key, window, slot.current)
            if floor > self._counters.get(counter, 0):
                self._add(counter, floor - self._counters.get(counter, 0), now + slot.ttl_s)

    async def restored(self) -> bool:
        return self._restored

    async def mark_restored(self) -> None:
        self._restored = True

    async def close(self) -> None:
        pass

    def _add(self, counter: str, amount: int, expires: float) -> None:
        if counter not in self._counters:
            heapq.heappush(self._expiries, (expires, counter))
        self._counters[counter] = self._counters.get(counter, 0) + amount

    def _expire(self, now: float) -> None:
        # A counter's expiry is set when it is created and only ever later for the same name,
        # so the heap's first entries are the ones due: the cost is per counter, not per hit.
        while self._expiries and self._expiries[0][0] <= now:
            _, counter = heapq.heappop(self._expiries)
            self._counters.pop(counter, None)


def ledger_for(url: str) -> Ledger:
    if url.startswith("memory://"):
        return MemoryLedger()
    return RedisLedger(url)
