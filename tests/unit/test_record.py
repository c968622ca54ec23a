"""One record per request: what it is charged, what it counts, and the log line it becomes."""

from __future__ import annotations

import logging
import re

import pytest
from prometheus_client import CollectorRegistry

from hermes_serve import errors
from hermes_serve.apis import Meter, Usage
from hermes_serve.metrics import GatewayMetrics
from hermes_serve.record import Fate, Record, charge, observe, usage_row
from tests.support.servers import REPO

OPERATIONS = (REPO / "docs" / "operations.md").read_text()


def observed(outcome: str, **fields: object) -> CollectorRegistry:
    registry = CollectorRegistry()
    status = errors.CODES[outcome].status if outcome in errors.CODES else 200
    record = Record("rid", "POST", "/v1/chat/completions", 0.0, key="team", status=status, outcome=outcome)
    for name, value in fields.items():
        setattr(record, name, value)
    observe(record, GatewayMetrics(registry), 0.25)
    return registry


@pytest.mark.parametrize("code", sorted(errors.REFUSALS))
def test_every_refusal_is_counted_under_its_code(code: str) -> None:
    registry = observed(code)
    assert registry.get_sample_value("hermes_rejections_total", {"key": "team", "reason": code}) == 1


@pytest.mark.parametrize("outcome", ["ok", *sorted(set(errors.CODES) - errors.REFUSALS)])
def test_what_is_not_a_refusal_is_not_counted_as_one(outcome: str) -> None:
    registry = observed(outcome)
    assert registry.get_sample_value("hermes_rejections_total", {"key": "team", "reason": outcome}) is None
    status = str(errors.CODES[outcome].status if outcome != "ok" else 200)
    labels = {"key": "team", "route": "/v1/chat/completions", "status": status}
    assert registry.get_sample_value("hermes_requests_total", labels) == 1


def test_the_operations_guide_names_every_refusal() -> None:
    row = next(line for line in OPERATIONS.splitlines() if line.startswith("| `hermes_rejections_total`"))
    meaning = row.split(" | ")[3]
    assert set(re.findall(r"`([a-z_]+)`", meaning)) == errors.REFUSALS


def test_the_log_line_has_both_ids_and_the_clients_cannot_pass_for_other_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="hermes_serve.access"):
        observed("ok", client_request_id='job-7 key=admin "x"', usage=Usage(input=7, cached=3, output=5))
        observed("ok")
    theirs, none = (record.getMessage() for record in caplog.records)
    assert theirs == (
        'id=rid client_request_id="job-7 key=admin \\"x\\"" key=team POST /v1/chat/completions '
        "status=200 outcome=ok tokens=12 duration_ms=250"
    )
    assert none.startswith("id=rid client_request_id=- key=team ")


# --- what a generation is charged ------------------------------------------------------------

PROMPT = 40  # the request's prompt estimate


@pytest.mark.parametrize(
    ("reported", "streamed", "delivered", "refused", "charged"),
    [
        (15, 3, True, False, 15),  # the engine's usage, streamed or whole
        (0, 0, True, False, 0),  # even none: what it reports is what it used
        (None, 3, True, False, PROMPT + 3),  # cut short mid-stream: no usage came
        (None, 0, True, False, PROMPT),  # cut short before its first token
        (None, 0, True, True, 0),  # the engine refused it (an error answer)
        (None, 0, False, False, 0),  # the engine never read it (queued, timed out, left)
    ],
)
def test_a_generation_is_charged_by_what_the_engine_reported_and_how_far_it_got(
    reported: int | None, streamed: int, delivered: bool, refused: bool, charged: int
) -> None:
    meter = Meter()
    meter.usage, meter.token_events = None if reported is None else Usage(input=reported), streamed
    asked: list[bool] = []

    def prompt_tokens() -> int:
        asked.append(True)
        return PROMPT

    assert charge(meter, Fate.of(delivered, refused), prompt_tokens).total == charged
    assert asked == ([True] if reported is None and delivered and not refused else []), "worked out if needed only"


@pytest.mark.parametrize(
    ("codes", "outcome"),
    [
        ([], "ok"),
        (["request_timeout"], "request_timeout"),
        (["engine_failed", "client_closed_request"], "client_closed_request"),  # it left: it left
        (["client_closed_request", "internal_error"], "client_closed_request"),
        (["queue_timeout", "internal_error"], "queue_timeout"),  # the first end is the outcome
    ],
)
def test_the_first_end_is_the_outcome_but_a_client_that_left_is_one_that_left(codes: list[str], outcome: str) -> None:
    record = Record("rid", "POST", "/v1/chat/completions", 0.0)
    for code in codes:
        record.end(code)
    assert record.outcome == outcome


def test_the_usage_row_holds_names_and_numbers_of_the_record() -> None:
    record = Record("rid", "POST", "/v1/messages", started=5.0, key="team", status=200)
    record.started_at, record.model, record.api, record.end_user = 1000.0, "m", "messages", "person"
    record.usage, record.queue_wait_s, record.admitted = Usage(20, 16, 3), 0.25, True
    record.client_request_id = "job-1"
    row = usage_row(record, ended_at=1002.5)
    assert (row.request_id, row.started, row.ended, row.key, row.model, row.api) == (
        "rid",
        1000.0,
        1002.5,
        "team",
        "m",
        "messages",
    )
    assert (row.input_tokens, row.cached_input_tokens, row.output_tokens) == (20, 16, 3)
    assert (row.status, row.outcome, row.queue_wait_s, row.admitted) == (200, "ok", 0.25, True)
    assert (row.end_user, row.client_request_id) == ("person", "job-1")
    unanswered = usage_row(Record("r2", "GET", "other", started=0.0), ended_at=1.0)
    assert (unanswered.input_tokens, unanswered.output_tokens, unanswered.admitted) == (0, 0, False)


def test_a_generation_cut_short_is_charged_its_prompt_as_input_and_its_stream_as_output() -> None:
    meter = Meter()
    meter.token_events = 3
    assert charge(meter, Fate.RAN, lambda: PROMPT) == Usage(input=PROMPT, output=3)
