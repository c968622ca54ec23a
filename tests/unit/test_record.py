"""One record per request: what it counts, and the log line it becomes."""

from __future__ import annotations

import logging
import re

import pytest
from prometheus_client import CollectorRegistry

from hermes_serve import errors
from hermes_serve.metrics import GatewayMetrics
from hermes_serve.record import Record, observe
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
        observed("ok", client_request_id='job-7 key=admin "x"', tokens=12)
        observed("ok")
    theirs, none = (record.getMessage() for record in caplog.records)
    assert theirs == (
        'id=rid client_request_id="job-7 key=admin \\"x\\"" key=team POST /v1/chat/completions '
        "status=200 outcome=ok tokens=12 duration_ms=250"
    )
    assert none.startswith("id=rid client_request_id=- key=team ")
