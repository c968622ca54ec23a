"""A key's limits as they stand: in ``GET /v1/usage`` for the calling key, and for operators
``python -m hermes_serve.usage limits`` (every configured key, read from the shared storage).
"""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import RedisError

from ..auth import Principal
from ..config import SettingsError, load_settings
from ..ledger import ledger_for
from ..limits import Limits, Standing
from .reports import KeyUsage


def iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def window_json(standing: Standing) -> dict[str, Any]:
    window = standing.window
    return {
        "limit": window.limit,
        "used": standing.used,
        "reserved": standing.reserved,
        "remaining": standing.remaining,
        "window": "rolling minute" if window.span == "minute" else f"calendar {window.span} (UTC)",
        "resets_at": iso(standing.resets_at),
    }


def usage_json(principal: Principal, standings: list[Standing], used: KeyUsage | None = None) -> dict[str, Any]:
    """The calling key's own standing: each limit and budget, when the key expires, and what it
    used this UTC day and month per model (``None`` when the server records no usage)."""
    return {
        "object": "usage",
        "key": principal.name,
        "admin": principal.admin,
        "expires_at": iso(principal.expires_at),
        "limits": {s.window.setting: window_json(s) for s in standings},
        "usage": None if used is None else used.json(),
    }


def table(rows: list[tuple[str, list[Standing], float | None, bool]]) -> str:
    lines = [f"{'key':<20} {'limit':<20} {'used':>12} {'reserved':>10} {'remaining':>12}  resets at"]
    for name, standings, expires, enabled in rows:
        note = ("" if enabled else " (disabled)") + (f" (expires {iso(expires)})" if expires else "")
        if not standings:
            lines.append(f"{name:<20} {'unlimited' + note}")
        for s in standings:
            lines.append(
                f"{name:<20} {s.window.setting:<20} {s.used:>12} {s.reserved:>10} {s.remaining:>12}  "
                f"{iso(s.resets_at) or '-'}{note}"
            )
    return "\n".join(lines)


async def _read_all() -> str:
    settings = load_settings(os.environ)
    if settings.limits_storage.startswith("memory://"):
        raise SettingsError(
            "limits_storage is memory://: the counts live inside the server process. "
            "Point limits_storage at Redis to read them from here, or ask GET /v1/usage with each key. What keys used is in the usage ledger: python -m hermes_serve.usage"
        )
    limits = Limits(ledger_for(settings.limits_storage), settings.admission.request_timeout_s)
    try:
        rows = []
        for key in settings.auth.keys:
            principal = Principal.of(key)
            rows.append((key.name, await limits.standing(principal), principal.expires_at, key.enabled))
    finally:
        await limits.close()
    return table(rows)


def main() -> int:
    try:
        print(asyncio.run(_read_all()))
    except SettingsError as exc:
        print(f"hermes-serve: {exc}", file=sys.stderr)
        return 2
    except RedisError as exc:
        print(f"hermes-serve: cannot read the shared storage: {exc}", file=sys.stderr)
        return 1
    return 0
