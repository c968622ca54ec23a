"""Per-key requests/min and tokens/min, on the ``limits`` library's moving window.

Tokens are reserved at admission from an upper-bound estimate and settled from real usage
afterwards. Reservations of requests still running live in the same storage as the windows,
so replicas sharing a Redis also share what is in flight. (Check-then-reserve is not atomic
across replicas: two requests racing on the last tokens may both pass; the overshoot is
bounded by one request each.)
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from limits import RateLimitItemPerMinute
from limits.aio.storage import Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

from . import errors
from .auth import Principal

RESERVATION_TTL_S = 3600  # a crashed replica's reservations heal after this


@dataclass(frozen=True)
class Reservation:
    principal: Principal
    tokens: int
    _headers: dict[str, str] = field(default_factory=dict)

    def headers(self) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers as of admission."""
        return dict(self._headers)


def openai_duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``6s``, ``1m5s``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def storage_for(uri: str) -> Storage:
    """``memory://`` or ``redis://...`` as the library's async storage (redis-py client)."""
    async_uri = uri if uri.startswith("async+") else f"async+{uri}"
    options = {"implementation": "redispy"} if "redis" in async_uri.split("://", 1)[0] else {}
    return storage_from_string(async_uri, **options)  # type: ignore[return-value]


class RateLimits:
    def __init__(self, storage_uri: str, wall_clock: Callable[[], float] = time.time) -> None:
        self._storage = storage_for(storage_uri)
        self._window = MovingWindowRateLimiter(self._storage)
        self._now = wall_clock  # the library stamps windows with time.time()

    async def admit(self, principal: Principal, estimated_tokens: int) -> Reservation:
        headers: dict[str, str] = {}
        name = principal.name
        if principal.tokens_per_minute is not None:
            limit = principal.tokens_per_minute
            if estimated_tokens > limit:
                raise errors.over_request_budget(estimated_tokens, limit, name)
            item = _tokens(limit)
            stats = await self._window.get_window_stats(item, name)
            available = stats.remaining - await self._reserved(name)
            headers |= self._headers("tokens", limit, available - estimated_tokens, stats.reset_time)
            if available < estimated_tokens:
                raise self._refusal("tokens", limit, stats.reset_time, name, headers)
        if principal.requests_per_minute is not None:
            limit = principal.requests_per_minute
            item = _requests(limit)
            admitted = await self._window.hit(item, name)
            stats = await self._window.get_window_stats(item, name)
            headers |= self._headers("requests", limit, stats.remaining, stats.reset_time)
            if not admitted:
                raise self._refusal("requests", limit, stats.reset_time, name, headers)
        if principal.tokens_per_minute is not None:
            await self._storage.incr(_reserved_key(name), RESERVATION_TTL_S, estimated_tokens)
        return Reservation(principal, estimated_tokens, headers)

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        principal = reservation.principal
        if principal.tokens_per_minute is None:
            return
        await self._storage.incr(_reserved_key(principal.name), RESERVATION_TTL_S, -reservation.tokens)
        item = _tokens(principal.tokens_per_minute)
        stats = await self._window.get_window_stats(item, principal.name)
        # A moving window refuses a hit larger than what is left, so charge what fits: the
        # estimate was an upper bound, and anything beyond it was already allowed to run.
        charge = min(used_tokens, stats.remaining)
        if charge > 0:
            await self._window.hit(item, principal.name, cost=charge)

    async def _reserved(self, name: str) -> int:
        return max(0, await self._storage.get(_reserved_key(name)))

    def _headers(self, what: str, limit: int, remaining: int, reset_at: float) -> dict[str, str]:
        return {
            f"x-ratelimit-limit-{what}": str(limit),
            f"x-ratelimit-remaining-{what}": str(max(0, remaining)),
            f"x-ratelimit-reset-{what}": openai_duration(reset_at - self._now()),
        }

    def _refusal(
        self, what: str, limit: int, reset_at: float, name: str, headers: dict[str, str]
    ) -> errors.OpenAIError:
        # One past the window edge: a client that waits exactly this long is admitted.
        retry_after = max(1, math.floor(reset_at - self._now()) + 1)
        error = errors.rate_limited(what, limit, retry_after, name)
        return dataclasses.replace(error, headers={**headers, **error.headers})


def _requests(limit: int) -> RateLimitItemPerMinute:
    return RateLimitItemPerMinute(limit, namespace="hermes-requests")


def _tokens(limit: int) -> RateLimitItemPerMinute:
    return RateLimitItemPerMinute(limit, namespace="hermes-tokens")


def _reserved_key(name: str) -> str:
    return f"hermes-reserved-tokens/{name}"
