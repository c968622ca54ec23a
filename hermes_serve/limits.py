"""A key's limits and budgets: checked and reserved before the engine runs, settled after.

Per minute (rolling) a key may have ``requests_per_minute`` and ``tokens_per_minute``; per
calendar day and month (UTC) the budgets ``requests_per_day``, ``tokens_per_day`` and
``tokens_per_month`` (``windows`` says why those kinds of window). At admission the request
is counted and its token estimate held against every token window; when it ends the hold is
released and the tokens really used are counted. A minute limit refuses with 429
``rate_limit_exceeded``, a budget with 429 ``insufficient_quota``; both say when they free.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from . import errors
from .auth import Principal
from .clock import WallClock, wall_time
from .errors import OpenAIError
from .ledger import Charge, Count, Hold, Ledger, StorageUnavailable, Tally
from .windows import Window, seconds_until_fits, used

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reservation:
    principal: Principal
    hold: Hold | None = None
    headers: dict[str, str] = field(default_factory=dict)
    """OpenAI's ``x-ratelimit-*`` headers as of admission."""


@dataclass(frozen=True)
class Standing:
    """One window of a key, as the key's own usage view shows it."""

    window: Window
    used: int
    reserved: int
    resets_at: float | None
    """When it frees entirely; None for a rolling minute that is already empty."""

    @property
    def remaining(self) -> int:
        return max(0, self.window.limit - self.used - self.reserved)


def openai_duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``6s``, ``1m5s``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


HOLD_MARGIN_S = 2  # past a request's time limit: the moment to abort it and settle


UNSETTLED_MAX = 100_000  # settlements kept while the storage is down (then the oldest go, logged)
OnStorage = Literal["refuse", "allow"]


class Limits:
    """Per-key limits over a ``Ledger``. While the shared storage does not answer, keys with
    limits are refused (``on_storage_failure="refuse"``: budgets hold) or admitted uncounted
    (``"allow"``: apps keep running); keys without limits never need it. Usage that cannot be
    settled is kept and counted when the storage answers again: no token goes uncharged."""

    def __init__(
        self,
        ledger: Ledger,
        request_timeout_s: float,
        wall_clock: WallClock = wall_time,
        on_storage_failure: OnStorage = "refuse",
        storage_state: Callable[[bool], None] = lambda up: None,
    ) -> None:
        self._ledger = ledger
        self._hold_s = request_timeout_s + HOLD_MARGIN_S
        """A reservation outlives its request by a moment at most: no request runs longer."""
        self._now = wall_clock
        self._on_failure = on_storage_failure
        self._storage_state = storage_state
        self._storage_up = True
        self._unsettled: deque[tuple[str, str, int, list[Window]]] = deque()

    async def admit(self, principal: Principal, estimated_tokens: int) -> Reservation:
        windows = principal.windows
        if not windows:
            return Reservation(principal)
        for window in windows:
            if window.unit == "tokens" and estimated_tokens > window.limit:
                raise errors.larger_than_limit(estimated_tokens, window.setting, window.limit, principal.name)
        now = self._now()
        holds_tokens = any(w.unit == "tokens" for w in windows)
        hold = Hold(secrets.token_hex(8), estimated_tokens, now + self._hold_s) if holds_tokens else None
        charges = [Charge(w, 1 if w.unit == "requests" else estimated_tokens) for w in windows]
        try:
            tally = await self._ledger.admit(principal.name, charges, hold, now)
        except StorageUnavailable as exc:
            self._storage(up=False, why=str(exc))
            if self._on_failure == "refuse":
                raise errors.limits_unavailable() from None
            return Reservation(principal, Hold("", 0, now) if holds_tokens else None)  # admitted uncounted
        self._storage(up=True)
        await self._settle_kept()
        headers = self._headers(tally, estimated_tokens, now)
        if tally.refused is not None:
            raise self._refusal(principal, tally, estimated_tokens, now, headers)
        return Reservation(principal, hold, headers)

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        if reservation.hold is None:
            return
        name, windows = reservation.principal.name, list(reservation.principal.windows)
        try:
            await self._ledger.settle(name, reservation.hold.id, used_tokens, windows, self._now())
        except StorageUnavailable as exc:
            self._storage(up=False, why=str(exc))
            if len(self._unsettled) >= UNSETTLED_MAX:
                lost = self._unsettled.popleft()
                logger.error("limits storage down too long: %d tokens of key %r dropped uncharged", lost[2], lost[0])
            self._unsettled.append((name, reservation.hold.id, used_tokens, windows))
            return
        self._storage(up=True)

    async def standing(self, principal: Principal) -> list[Standing]:
        if not principal.windows:
            return []
        now = self._now()
        try:
            tally = await self._ledger.read(principal.name, list(principal.windows), now)
        except StorageUnavailable as exc:
            self._storage(up=False, why=str(exc))
            raise errors.limits_unavailable() from None
        return [
            Standing(
                c.window,
                math.ceil(used(c.slot, c.current, c.previous)),
                tally.reserved if c.window.unit == "tokens" else 0,
                _empty_at(c, now),
            )
            for c in tally.counts
        ]

    @property
    def unsettled(self) -> int:
        """Settlements waiting for the storage to answer again."""
        return len(self._unsettled)

    async def _settle_kept(self, at_most: int = 10) -> None:
        # A few per admission, so no one request carries a long outage's backlog.
        for _ in range(min(at_most, len(self._unsettled))):
            name, hold_id, tokens, windows = self._unsettled[0]
            try:
                await self._ledger.settle(name, hold_id, tokens, windows, self._now())
            except StorageUnavailable:
                return
            self._unsettled.popleft()

    def _storage(self, up: bool, why: str = "") -> None:
        if up == self._storage_up:
            return
        self._storage_up = up
        if up:
            logger.warning("limits storage reachable again; %d kept settlements to count", len(self._unsettled))
        else:
            action = "refusing" if self._on_failure == "refuse" else "admitting uncounted"
            logger.error("limits storage unreachable (%s): %s requests of keys with limits", why, action)
        self._storage_state(up)

    async def close(self) -> None:
        await self._ledger.close()

    def _headers(self, tally: Tally, cost: int, now: float) -> dict[str, str]:
        headers: dict[str, str] = {}
        for count in tally.counts:
            window = count.window
            if window.span != "minute":
                continue
            taken = used(count.slot, count.current, count.previous) + (tally.reserved if window.unit == "tokens" else 0)
            charged = 1 if window.unit == "requests" else cost
            remaining = window.limit - math.ceil(taken) - (charged if tally.refused is None else 0)
            reset = _empty_at(count, now)
            headers |= {
                f"x-ratelimit-limit-{window.unit}": str(window.limit),
                f"x-ratelimit-remaining-{window.unit}": str(max(0, remaining)),
                f"x-ratelimit-reset-{window.unit}": openai_duration(reset - now if reset else 0),
            }
        return headers

    def _refusal(
        self, principal: Principal, tally: Tally, cost: int, now: float, headers: dict[str, str]
    ) -> OpenAIError:
        count = next(c for c in tally.counts if c.window == tally.refused)
        window, slot = count.window, count.slot
        charged = 1 if window.unit == "requests" else cost
        if window.is_budget:
            return errors.insufficient_quota(window.setting, window.limit, principal.name, slot.resets_at, now)
        held = tally.reserved if window.unit == "tokens" else 0
        wait = seconds_until_fits(window, slot, now, count.current, count.previous, charged + held)
        if math.isinf(wait):  # what running requests hold will free when they end
            wait = seconds_until_fits(window, slot, now, count.current, count.previous, charged)
        # One past the moment it fits: a client that waits exactly this long is admitted.
        error = errors.rate_limited(window.unit, window.limit, math.floor(wait) + 1, principal.name)
        error.headers = {**headers, **error.headers}
        return error


def _empty_at(count: Count, now: float) -> float | None:
    """When the window holds nothing of what is counted now."""
    if count.slot.previous is None:
        return count.slot.resets_at if count.current else None
    if count.current:
        return count.slot.resets_at + 60
    return count.slot.resets_at if count.previous else None
