"""Budgets that survive: the day and month counters rebuilt from the usage ledger's rollups.

At start-up, and whenever the limits storage comes back empty (a restart with ``memory://``,
a flushed or replaced Redis), each key's current day and month counts are lifted to what the
ledger says it was charged. Lifting (never lowering) makes it safe for every replica to do it
at once, and leaves alone what was counted since.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from ..auth import Principal
from ..clock import WallClock, wall_time
from ..ledger import Ledger, StorageUnavailable
from ..windows import Window
from .reports import Spent, spent
from .store import Store

logger = logging.getLogger("hermes_serve.usage")

CHECK_INTERVAL_S = 5.0  # one EXISTS per replica per interval: nothing per request


def floors(principal: Principal, charged: Spent) -> list[tuple[Window, int]]:
    """The counts of ``principal``'s budget windows that ``charged`` rebuilds."""
    found = []
    for window in principal.windows:
        if window.span == "minute":
            continue
        if window.span == "day":
            count = charged.day_requests if window.unit == "requests" else charged.day_tokens
        else:
            count = charged.month_requests if window.unit == "requests" else charged.month_tokens
        found.append((window, count))
    return found


async def restore(ledger: Ledger, store: Store, principals: Sequence[Principal], now: float) -> int:
    """Rebuilds the budgets of ``principals`` in ``ledger``; returns how many keys it lifted."""
    budgeted = [p for p in principals if any(w.span != "minute" for w in p.windows)]
    charged = await asyncio.to_thread(spent, store, now, [p.name for p in budgeted]) if budgeted else {}
    for principal in budgeted:
        if principal.name in charged:
            await ledger.raise_to(principal.name, floors(principal, charged[principal.name]), now)
    await ledger.mark_restored()
    return len(charged)


async def check(
    ledger: Ledger,
    store: Store,
    principals: Sequence[Principal],
    now: float,
    flush: Callable[[], Awaitable[object]] | None = None,
) -> bool:
    """Rebuilds the budgets if the limits storage does not hold them (first writing what the
    ledger has queued, so the last requests count too). False if it could not yet."""
    try:
        if await ledger.restored():
            return True
        if flush is not None:
            await flush()
        lifted = await restore(ledger, store, principals, now)
    except StorageUnavailable:
        return False  # the limits say so themselves; rebuilt once it answers
    except Exception as exc:  # the usage store did not answer: tried again next time
        logger.warning("budgets not yet rebuilt from the usage ledger: %s", type(exc).__name__)
        return False
    logger.info("budgets rebuilt from the usage ledger: %d keys had spent this day or month", lifted)
    return True


async def keep_restored(
    ledger: Ledger,
    store: Store,
    principals: Callable[[], Sequence[Principal]],
    wall_clock: WallClock = wall_time,
    flush: Callable[[], Awaitable[object]] | None = None,
    interval_s: float = CHECK_INTERVAL_S,
) -> None:
    """Checks every ``interval_s`` that the limits storage holds the rebuilt budgets, and
    rebuilds them when it does not (a flushed Redis). Runs until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        await check(ledger, store, principals(), wall_clock(), flush)
