"""Reading the ledger: a key's own usage, OpenAI's usage API through its own SDK, end users."""

from __future__ import annotations

from base64 import b64encode
from pathlib import Path
from struct import pack
from typing import Any
from urllib.parse import parse_qsl

import httpx
import openai
import pytest
from openai.types.admin.organization.usage_completions_response import UsageCompletionsResponse

from hermes_serve.usage.reports import (
    Totals,
    UsageQueryError,
    completions_usage,
    completions_usage_query,
    end_user_rows,
    end_user_totals,
    key_usage,
)
from hermes_serve.usage.store import (
    END_USER_MAX,
    SqliteStore,
    Store,
)
from tests.support.usage import (
    DAY0,
    MIXED,
    NOW,
    T0,
    Backend,
    Ledgers,
    row,
)


async def test_a_key_sees_its_usage_today_and_this_month_per_model(backend: Backend, ledgers: Ledgers) -> None:
    earlier = [row("m1", at=DAY0 - 2 * 86400), row("m2", at=DAY0 - 40 * 86400, model="m2")]
    ledger = await ledgers()
    for r in [*MIXED, *earlier]:
        ledger.record(r)
    assert await ledger.flush()
    usage = key_usage(backend.make(), "app", now=NOW)
    assert usage.today == {
        "m1": Totals(requests=4, model_requests=3, errors=2, input_tokens=30, cached_input_tokens=12, output_tokens=12),
        "m2": Totals(requests=1, model_requests=1, errors=0, input_tokens=100, cached_input_tokens=0, output_tokens=50),
    }
    assert usage.month["m1"].requests == 5 and usage.month["m2"] == usage.today["m2"]
    assert usage.json()["today"]["since"] == "2026-12-04T00:00Z"
    assert key_usage(backend.make(), "nobody", now=NOW).month == {}


def sdk(store: Store, seen: list[dict[str, Any]]) -> openai.OpenAI:
    """The OpenAI SDK, its usage calls answered by ``completions_usage_query`` over ``store``."""

    def answer(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/organization/usage/completions"
        try:
            body = completions_usage_query(store, parse_qsl(request.url.query.decode()), now=NOW)
        except UsageQueryError as exc:
            error = {"message": str(exc), "type": "invalid_request_error", "param": exc.param, "code": None}
            return httpx.Response(400, json={"error": error})
        seen.append(body)
        return httpx.Response(200, json=body)

    return openai.OpenAI(
        api_key="unused",
        admin_api_key="admin",
        base_url="http://ledger.test/v1",
        http_client=httpx.Client(transport=httpx.MockTransport(answer)),
        max_retries=0,
    )


RESULT_KEYS = [
    "object",
    "input_tokens",
    "output_tokens",
    "input_cached_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
    "num_model_requests",
    "project_id",
    "user_id",
    "api_key_id",
    "model",
    "batch",
]


def check_shape(page: dict[str, Any]) -> None:
    """OpenAI's page, exactly: these keys, these types, nothing more."""
    assert list(page) == ["object", "data", "has_more", "next_page"] and page["object"] == "page"
    assert isinstance(page["has_more"], bool) and (page["next_page"] is None) != page["has_more"]
    for bucket in page["data"]:
        assert list(bucket) == ["object", "start_time", "end_time", "results"] and bucket["object"] == "bucket"
        for result in bucket["results"]:
            assert list(result) == RESULT_KEYS
            assert result["object"] == "organization.usage.completions.result"
            assert all(type(result[k]) is int for k in RESULT_KEYS[1:7])
            assert result["project_id"] is result["user_id"] is result["batch"] is None
    UsageCompletionsResponse.model_validate(page)


async def test_the_openai_usage_api_through_its_own_sdk(backend: Backend, ledgers: Ledgers) -> None:
    rows = [*MIXED, row("next-day", at=T0 + 86400, key="other", model="m2", input_tokens=7)]
    ledger = await ledgers()
    for r in rows:
        ledger.record(r)
    assert await ledger.flush()
    seen: list[dict[str, Any]] = []
    usage = sdk(backend.make(), seen).admin.organization.usage

    # Days (the default): every bucket listed, empty ones too; the first is start_time's own day.
    page = usage.completions(start_time=DAY0 - 86400 + 5 * 3600, end_time=DAY0 + 2 * 86400)
    assert [b.start_time for b in page.data] == [DAY0 - 86400, DAY0, DAY0 + 86400]
    assert [b.end_time - b.start_time for b in page.data] == [86400] * 3
    assert page.data[0].results == []
    (today,) = page.data[1].results
    assert (today.input_tokens, today.input_cached_tokens, today.output_tokens) == (140, 16, 67)
    assert today.num_model_requests == 5  # the refusals never reached the model
    assert today.api_key_id is today.model is None
    assert not page.has_more and page.next_page is None

    # Hours, grouped and filtered.
    page = usage.completions(
        start_time=T0,
        end_time=T0 + 2 * 3600,
        bucket_width="1h",
        group_by=["api_key_id", "model", "project_id"],
        api_key_ids=["app"],
    )
    ten, eleven = page.data
    assert [(r.api_key_id, r.model, r.num_model_requests) for r in ten.results] == [("app", "m1", 2), ("app", "m2", 1)]
    assert [(r.api_key_id, r.model, r.input_tokens) for r in eleven.results] == [("app", "m1", 10)]
    assert all(r.project_id is None for r in ten.results)
    page = usage.completions(start_time=T0, end_time=T0 + 3600, bucket_width="1h", group_by=["model"], models=["m2"])
    assert [(r.api_key_id, r.model, r.output_tokens) for r in page.data[0].results] == [(None, "m2", 50)]

    # Minutes come from the ledger; pages of `limit` buckets, followed by next_page.
    buckets = []
    cursor: str | openai.Omit = openai.omit
    while True:
        page = usage.completions(start_time=T0 - 60, end_time=T0 + 300, bucket_width="1m", limit=2, page=cursor)
        buckets += page.data
        if not page.has_more:
            break
        assert page.next_page is not None
        cursor = page.next_page
    assert [b.start_time for b in buckets] == list(range(T0 - 60, T0 + 300, 60))
    assert [sum(r.num_model_requests for r in b.results) for b in buckets] == [0, 4, 0, 0, 0, 0]

    # Projects, users and batches do not exist here.
    assert all(not b.results for b in usage.completions(start_time=DAY0, end_time=DAY0 + 86400, project_ids=["p"]).data)
    assert not usage.completions(start_time=DAY0, end_time=DAY0 + 86400, batch=True).data[0].results
    assert usage.completions(start_time=DAY0, end_time=DAY0 + 86400, batch=False).data[0].results
    for body in seen:
        check_shape(body)


async def test_the_usage_api_defaults_to_openais_page_sizes(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "usage.db")
    store.migrate()
    sizes = {
        width: len(completions_usage(store, start_time=0, end_time=10**8, bucket_width=width, now=NOW)["data"])
        for width in ("1d", "1h", "1m")
    }
    assert sizes == {"1d": 7, "1h": 24, "1m": 60}
    page = completions_usage(store, start_time=NOW - 3 * 86400, now=NOW)  # up to now by default
    assert len(page["data"]) == 4 and not page["has_more"]


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({}, "start_time"),
        ({"start_time": "x"}, "start_time"),
        ({"start_time": "0", "bucket_width": "1w"}, "bucket_width"),
        ({"start_time": "0", "bucket_width": "1d", "limit": "32"}, "limit"),
        ({"start_time": "0", "bucket_width": "1h", "limit": "169"}, "limit"),
        ({"start_time": "0", "bucket_width": "1m", "limit": "0"}, "limit"),
        ({"start_time": "0", "group_by[]": "colour"}, "group_by"),
        ({"start_time": "100", "end_time": "100"}, "end_time"),
        ({"start_time": "0", "page": "nonsense!"}, "page"),
        ({"start_time": "0", "end_time": "86400", "page": "page_" + b64encode(pack(">q", 86400)).decode()}, "page"),
        ({"start_time": "0", "batch": "maybe"}, "batch"),
    ],
)
def test_the_usage_api_refuses_what_it_cannot_answer(tmp_path: Path, query: dict[str, str], param: str) -> None:
    store = SqliteStore(tmp_path / "usage.db")
    store.migrate()
    with pytest.raises(UsageQueryError) as refused:
        completions_usage_query(store, query.items(), now=NOW)
    assert refused.value.param == param


async def test_end_users_are_read_from_the_ledger(backend: Backend, ledgers: Ledgers) -> None:
    long_id = "u" * 200
    extra = [row(10, at=T0 + 60, end_user=long_id), row(11, at=T0 + 120, end_user="user-1", input_tokens=1)]
    ledger = await ledgers()
    for r in [*MIXED, *extra]:
        ledger.record(r)
    assert await ledger.flush()
    store = backend.make()
    found = end_user_rows(store, "app", "user-1", since=DAY0, until=DAY0 + 86400)
    assert [r.request_id for r in found] == ["req-3", "req-11"]  # newest first
    assert found[0] == MIXED[2] and found[0].duration_s == 1.5 and found[0].client_request_id == "client 3"
    assert [r.request_id for r in end_user_rows(store, "app", long_id, since=DAY0, until=DAY0 + 86400)] == ["req-10"]
    totals = {(k, u): t for k, u, t in end_user_totals(store, since=DAY0, until=DAY0 + 86400)}
    assert set(totals) == {("app", "u" * END_USER_MAX), ("app", "user-1"), ("app", "user-2"), ("other", "user-1")}
    assert totals[("app", "user-1")] == Totals(2, 2, 0, 11, 8, 10)
    assert [u for _, u, _ in end_user_totals(store, since=DAY0, until=DAY0 + 86400, key="other")] == ["user-1"]
