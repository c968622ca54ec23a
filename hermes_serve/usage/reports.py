"""Reading the usage ledger: plain functions over a ``Store``.

A key's usage today and this month, OpenAI's organization usage API
(``/v1/organization/usage/completions``), end users' rows, budgets' counts rebuilt, and the
operators' table. Every read uses the rollups, except 1-minute buckets and end users, which
need the ledger (kept ``retention_days``; rollups are kept for good).
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterable, Sequence
from dataclasses import asdict, astuple, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from .store import COLUMNS, DAY, END_USER_MAX, HOUR, Store, UsageRow, _ms, _text


@dataclass(frozen=True)
class Totals:
    requests: int = 0
    model_requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    admitted: int = 0

    @classmethod
    def of(cls, values: Sequence[Any]) -> Totals:
        return cls(*(int(v or 0) for v in values))

    def json(self) -> dict[str, int]:
        shown = asdict(self)
        del shown["admitted"]  # the budgets' business
        return shown

    def __add__(self, other: Totals) -> Totals:
        return Totals(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


_SUMS = (
    "SUM(requests), SUM(model_requests), SUM(errors), SUM(input_tokens), SUM(cached_tokens), SUM(output_tokens),"
    " SUM(admitted)"
)
_LEDGER_SUMS = (
    "COUNT(*), SUM(CASE WHEN input_tokens + output_tokens > 0 THEN 1 ELSE 0 END), "
    "SUM(CASE WHEN outcome <> 'ok' THEN 1 ELSE 0 END), SUM(input_tokens), SUM(cached_tokens), SUM(output_tokens),"
    " SUM(admitted)"
)


NO_MODEL = "(none)"
"""How requests that named no model we serve (a 401, a made-up path) are listed."""


@dataclass(frozen=True)
class KeyUsage:
    """One key's usage per model, this UTC day and this UTC month (from the rollups)."""

    key: str
    day_start: int
    month_start: int
    today: dict[str, Totals]
    month: dict[str, Totals]

    def json(self) -> dict[str, Any]:
        def period(start: int, models: dict[str, Totals]) -> dict[str, Any]:
            total = sum(models.values(), Totals())
            return {
                "since": _iso(start),
                **total.json(),
                "models": {m or NO_MODEL: t.json() for m, t in sorted(models.items())},
            }

        return {"today": period(self.day_start, self.today), "month": period(self.month_start, self.month)}


def period_starts(now: float) -> tuple[int, int]:
    """When this UTC day and this UTC month began: the budgets' calendar periods."""
    today = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return int(today.timestamp()), int(today.replace(day=1).timestamp())


def key_usage(store: Store, key: str, now: float) -> KeyUsage:
    day_start, month_start = period_starts(now)

    def by_model(since: int) -> dict[str, Totals]:
        rows = store.query(
            f"SELECT model, {_SUMS} FROM usage_rollups WHERE key_name = ? AND hour >= ? GROUP BY model",
            (key, since),
        )
        return {model: Totals.of(values) for model, *values in rows}

    return KeyUsage(key, day_start, month_start, by_model(day_start), by_model(month_start))


class UsageQueryError(ValueError):
    """A parameter of the usage API that cannot be served: a 400 naming ``param``."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


BUCKET_WIDTHS = {"1m": 60, "1h": HOUR, "1d": DAY}
BUCKET_LIMITS = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}
"""OpenAI's documented (default, max) number of buckets per page."""
GROUP_FIELDS = ("project_id", "user_id", "api_key_id", "model", "batch", "service_tier", "api_source")
_ARRAY_PARAMS = ("group_by", "api_key_ids", "models", "project_ids", "user_ids")


def completions_usage(
    store: Store,
    *,
    start_time: int,
    now: float,
    end_time: int | None = None,
    bucket_width: str = "1d",
    group_by: Sequence[str] = (),
    api_key_ids: Sequence[str] = (),
    models: Sequence[str] = (),
    project_ids: Sequence[str] = (),
    user_ids: Sequence[str] = (),
    batch: bool | None = None,
    limit: int | None = None,
    page: str | None = None,
) -> dict[str, Any]:
    """OpenAI's ``GET /v1/organization/usage/completions``, its parameters and its page.

    ``api_key_id`` is the key's name. Buckets are whole UTC minutes, hours or days: the first
    is the one ``start_time`` falls in, and every bucket up to ``end_time`` (default: now) is
    listed, empty ones too. Only requests the model worked for count (``num_model_requests``).
    Projects, users and batches do not exist here: grouped by, they read null; filtered on,
    they match nothing (``batch=false`` matches everything).
    """
    if bucket_width not in BUCKET_WIDTHS:
        raise UsageQueryError("bucket_width must be one of 1m, 1h, 1d.", "bucket_width")
    width = BUCKET_WIDTHS[bucket_width]
    default_limit, max_limit = BUCKET_LIMITS[bucket_width]
    limit = default_limit if limit is None else limit
    if not 1 <= limit <= max_limit:
        raise UsageQueryError(f"limit must be between 1 and {max_limit} for bucket_width={bucket_width}.", "limit")
    unknown = sorted(set(group_by) - set(GROUP_FIELDS))
    if unknown:
        raise UsageQueryError(f"group_by accepts {', '.join(GROUP_FIELDS)}; not {', '.join(unknown)}.", "group_by")
    end = int(now) + 1 if end_time is None else end_time
    if end <= start_time:
        raise UsageQueryError("end_time must be after start_time.", "end_time")
    first = start_time // width * width
    stop = -(-end // width) * width
    begin = first if page is None else _page_start(page, first, stop, width)
    page_end = min(begin + limit * width, stop)
    buckets: dict[int, list[dict[str, Any]]] = {b: [] for b in range(begin, page_end, width)}
    if not project_ids and not user_ids and batch is not True:
        by_key, by_model = "api_key_id" in group_by, "model" in group_by
        for bucket, key, model, *sums in _usage_groups(
            store, width, begin, page_end, by_key, by_model, api_key_ids, models
        ):
            totals = Totals.of(sums)
            buckets[int(bucket)].append(
                {
                    "object": "organization.usage.completions.result",
                    "input_tokens": totals.input_tokens,
                    "output_tokens": totals.output_tokens,
                    "input_cached_tokens": totals.cached_input_tokens,
                    "input_audio_tokens": 0,
                    "output_audio_tokens": 0,
                    "num_model_requests": totals.model_requests,
                    "project_id": None,
                    "user_id": None,
                    "api_key_id": key,
                    "model": model,
                    "batch": None,
                }
            )
    for results in buckets.values():
        results.sort(key=lambda r: (r["api_key_id"] or "", r["model"] or ""))
    has_more = page_end < stop
    return {
        "object": "page",
        "data": [
            {"object": "bucket", "start_time": b, "end_time": b + width, "results": results}
            for b, results in buckets.items()
        ],
        "has_more": has_more,
        "next_page": _page_cursor(page_end) if has_more else None,
    }


def completions_usage_query(store: Store, query: Iterable[tuple[str, str]], now: float) -> dict[str, Any]:
    """``completions_usage`` from a query string's pairs, as the SDKs send them (arrays as
    ``group_by[]=model`` or ``group_by=model``, repeated)."""
    arrays: dict[str, list[str]] = {name: [] for name in _ARRAY_PARAMS}
    single: dict[str, str] = {}
    for name, value in query:
        bare = name.removesuffix("[]")
        if bare in arrays:
            arrays[bare].append(value)
        else:
            single[bare] = value

    def integer(name: str) -> int | None:
        if name not in single:
            return None
        try:
            return int(single[name])
        except ValueError:
            raise UsageQueryError(f"{name} must be an integer.", name) from None

    start_time = integer("start_time")
    if start_time is None:
        raise UsageQueryError("start_time is required.", "start_time")
    batch = single.get("batch")
    if batch not in (None, "true", "false"):
        raise UsageQueryError("batch must be true or false.", "batch")
    return completions_usage(
        store,
        start_time=start_time,
        now=now,
        end_time=integer("end_time"),
        bucket_width=single.get("bucket_width", "1d"),
        limit=integer("limit"),
        page=single.get("page"),
        batch=None if batch is None else batch == "true",
        group_by=arrays["group_by"],
        api_key_ids=arrays["api_key_ids"],
        models=arrays["models"],
        project_ids=arrays["project_ids"],
        user_ids=arrays["user_ids"],
    )


def _page_cursor(bucket: int) -> str:
    return "page_" + base64.urlsafe_b64encode(struct.pack(">q", bucket)).decode()


def _page_start(page: str, first: int, stop: int, width: int) -> int:
    try:
        (bucket,) = struct.unpack(">q", base64.urlsafe_b64decode(page.removeprefix("page_")))
    except (ValueError, struct.error):
        raise UsageQueryError("page is not a cursor this API returned.", "page") from None
    if not first <= bucket < stop or (bucket - first) % width:
        raise UsageQueryError("page does not belong to this query.", "page")
    return int(bucket)


def _usage_groups(
    store: Store,
    width: int,
    begin: int,
    end: int,
    by_key: bool,
    by_model: bool,
    api_key_ids: Sequence[str],
    models: Sequence[str],
) -> list[tuple[Any, ...]]:
    # Minutes come from the ledger; hours and days from the rollups (whole hours, so exact).
    params: list[Any]
    if width < HOUR:
        table, bucket, sums = "usage_requests", f"(ended_ms / {width * 1000}) * {width}", _LEDGER_SUMS
        where, params = "ended_ms >= ? AND ended_ms < ?", [begin * 1000, end * 1000]
        served = "SUM(CASE WHEN input_tokens + output_tokens > 0 THEN 1 ELSE 0 END)"
    else:
        table, bucket, sums = "usage_rollups", f"(hour / {width}) * {width}", _SUMS
        where, params = "hour >= ? AND hour < ?", [begin, end]
        served = "SUM(model_requests)"
    for column, wanted in (("key_name", api_key_ids), ("model", models)):
        if wanted:
            where += f" AND {column} IN ({', '.join('?' * len(wanted))})"
            params += list(wanted)
    key = "key_name" if by_key else "NULL"
    model = "model" if by_model else "NULL"
    groups = ", ".join(["bucket"] + ["key_name"] * by_key + ["model"] * by_model)
    return store.query(
        f"SELECT {bucket} AS bucket, {key}, {model}, {sums} FROM {table} WHERE {where} "
        f"GROUP BY {groups} HAVING {served} > 0",
        params,
    )


def end_user_rows(
    store: Store, key: str, end_user: str, since: float, until: float, limit: int = 1000
) -> list[UsageRow]:
    """One end user's requests through one key, newest first, from the ledger."""
    rows = store.query(
        f"SELECT {', '.join(COLUMNS)} FROM usage_requests "
        "WHERE key_name = ? AND end_user = ? AND ended_ms >= ? AND ended_ms < ? ORDER BY ended_ms DESC LIMIT ?",
        (key, _text(end_user, END_USER_MAX), _ms(since), _ms(until), limit),
    )
    return [UsageRow.from_values(row) for row in rows]


def end_user_totals(store: Store, since: float, until: float, key: str | None = None) -> list[tuple[str, str, Totals]]:
    """Each (key, end user)'s totals over a time range, from the ledger; requests naming no
    end user are left out."""
    where = "end_user IS NOT NULL AND ended_ms >= ? AND ended_ms < ?"
    params: list[Any] = [_ms(since), _ms(until)]
    if key is not None:
        where, params = "key_name = ? AND " + where, [key, *params]
    rows = store.query(
        f"SELECT key_name, end_user, {_LEDGER_SUMS} FROM usage_requests WHERE {where} GROUP BY key_name, end_user",
        params,
    )
    return sorted((k, user, Totals.of(values)) for k, user, *values in rows)


GROUPS = {"key": ("key_name",), "model": ("model",), "user": ("key_name", "end_user")}
TABLE_HEADER = ("period", "requests", "errors", "input_tokens", "cached_input_tokens", "output_tokens")


def usage_table(
    store: Store, by: Literal["day", "hour"], group: Literal["key", "model", "user"], since: float, until: float
) -> list[tuple[Any, ...]]:
    """The operators' view: (period start, *group, requests, errors, input, cached, output) per
    whole UTC day or hour from ``since`` to ``until``. End users come from the ledger (its
    retention); keys and models from the rollups."""
    width = DAY if by == "day" else HOUR
    start = int(since) // width * width
    columns = ", ".join(GROUPS[group])
    if group == "user":
        sql = (
            f"SELECT (ended_ms / {width * 1000}) * {width} AS period, {columns}, {_LEDGER_SUMS} FROM usage_requests "
            f"WHERE ended_ms >= ? AND ended_ms < ? GROUP BY period, {columns}"
        )
        params = (start * 1000, _ms(until))
    else:
        sql = (
            f"SELECT (hour / {width}) * {width} AS period, {columns}, {_SUMS} FROM usage_rollups "
            f"WHERE hour >= ? AND hour < ? GROUP BY period, {columns}"
        )
        params = (start, int(until))
    table = []
    for period, *rest in store.query(sql, params):
        names, totals = rest[: len(GROUPS[group])], Totals.of(rest[len(GROUPS[group]) :])
        table.append(
            (
                _iso(int(period), hours=by == "hour"),
                *(name if name is not None else "" for name in names),
                totals.requests,
                totals.errors,
                totals.input_tokens,
                totals.cached_input_tokens,
                totals.output_tokens,
            )
        )
    return sorted(table)


def _iso(timestamp: int, hours: bool = True) -> str:
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.strftime("%Y-%m-%dT%H:%MZ") if hours else moment.strftime("%Y-%m-%d")


@dataclass(frozen=True)
class Spent:
    """What one key was charged this UTC day and this UTC month: what its budgets count."""

    day_requests: int = 0
    day_tokens: int = 0
    month_requests: int = 0
    month_tokens: int = 0


def spent(store: Store, now: float, keys: Sequence[str] | None = None) -> dict[str, Spent]:
    """Each key's charges this day and month, from the rollups (two grouped reads, whatever
    the number of keys): what a restart or an emptied Redis rebuilds the budgets from."""
    day_start, month_start = period_starts(now)
    where, params = "hour >= ?", list[Any]([month_start])
    if keys is not None:
        if not keys:
            return {}
        where += f" AND key_name IN ({', '.join('?' * len(keys))})"
        params += list(keys)
    rows = store.query(
        "SELECT key_name, CASE WHEN hour >= ? THEN 1 ELSE 0 END, SUM(admitted), SUM(input_tokens + output_tokens) "
        f"FROM usage_rollups WHERE {where} GROUP BY 1, 2",
        [day_start, *params],
    )
    found: dict[str, list[int]] = {}
    for key, today_, requests, tokens in rows:
        sums = found.setdefault(key, [0, 0, 0, 0])
        if today_:
            sums[0] += int(requests or 0)
            sums[1] += int(tokens or 0)
        sums[2] += int(requests or 0)
        sums[3] += int(tokens or 0)
    return {key: Spent(*sums) for key, sums in found.items()}
