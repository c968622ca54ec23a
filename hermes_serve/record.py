"""One record of what happened to a request, what it is charged, and the one place the record
becomes metrics and a log line."""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from . import errors
from .apis import Meter, Usage
from .metrics import GatewayMetrics
from .usage.store import UsageRow

logger = logging.getLogger("hermes_serve.access")


@dataclass
class Record:
    request_id: str
    method: str
    route: str
    """The route's pattern, or "other": a bounded label set for metrics and the log."""
    started: float
    """When the request arrived, on the gateway's clock."""
    key: str = "unknown"
    status: int | None = None
    """The status the client was sent."""
    outcome: str = "ok"
    """"ok", or the code of the error the request ended with."""
    usage: Usage | None = None
    """Tokens charged to the key (generation routes only)."""
    client_request_id: str | None = None
    """The client's own id for the request (``X-Client-Request-Id``), beside ours; never the engine's."""
    started_at: float = 0.0
    """When it arrived, on the wall clock (UTC epoch seconds): for the usage ledger."""
    model: str = ""
    """The model or adapter it named, once the key may use it."""
    api: str | None = None
    """The generation API (``apis.Api.name``), for generations."""
    end_user: str | None = None
    """The app's own id for the person behind the request, where the request names one."""
    queue_wait_s: float = 0.0
    admitted: bool = False
    """Whether the key's limits let it in (it counts in the key's request windows)."""

    @property
    def tokens(self) -> int | None:
        return None if self.usage is None else self.usage.total

    def end(self, code: str) -> None:
        """The request ends with the error ``code``. The first such end is its outcome, but a
        client that left is recorded as one that left, whatever was answered into the void."""
        if self.outcome == "ok" or code == errors.CLIENT_CLOSED_REQUEST:
            self.outcome = code


class Fate(enum.Enum):
    """How far a generation got with the engine."""

    UNSENT = "the engine never read the request"
    REFUSED = "the engine read it and answered with an error"
    RAN = "the engine read it and did not refuse it"

    @classmethod
    def of(cls, delivered: bool, refused: bool) -> Fate:
        if not delivered:
            return cls.UNSENT
        return cls.REFUSED if refused else cls.RAN


def charge(meter: Meter, fate: Fate, prompt_tokens: Callable[[], int]) -> Usage:
    """The tokens a generation is charged: what the engine reported using; else, for one the
    engine ran but which was cut short (so it reported nothing), its prompt estimate and the
    tokens already streamed, or leaving early would be a way around the key's limits; else
    none. ``prompt_tokens`` is only worked out for a request cut short."""
    if meter.usage is not None:
        return meter.usage
    if fate is Fate.RAN:
        return Usage(input=prompt_tokens(), output=meter.token_events)
    return Usage()


def observe(record: Record, metrics: GatewayMetrics, duration_s: float) -> None:
    metrics.requests.labels(record.key, record.route, str(record.status)).inc()
    metrics.duration.labels(record.route).observe(duration_s)
    if record.outcome in errors.REFUSALS:  # the gateway refusing or cutting it: errors.CODES says which
        metrics.rejections.labels(record.key, record.outcome).inc()
    if record.tokens is not None:
        metrics.tokens.labels(record.key).inc(record.tokens)
    # Key name and numbers only: never the key, never prompt text. The client's id is quoted:
    # it may hold spaces, and must not read as more fields.
    client_id = json.dumps(record.client_request_id) if record.client_request_id is not None else "-"
    logger.info(
        "id=%s client_request_id=%s key=%s %s %s status=%s outcome=%s tokens=%s duration_ms=%.0f",
        record.request_id,
        client_id,
        record.key,
        record.method,
        record.route,
        record.status,
        record.outcome,
        record.tokens,
        duration_s * 1000,
    )


def usage_row(record: Record, ended_at: float) -> UsageRow:
    """The record as the usage ledger keeps it: names and numbers only."""
    usage = record.usage or Usage()
    return UsageRow(
        request_id=record.request_id,
        started=record.started_at,
        ended=ended_at,
        key=record.key,
        model=record.model,
        api=record.api,
        status=record.status,
        outcome=record.outcome,
        input_tokens=usage.input,
        cached_input_tokens=usage.cached,
        output_tokens=usage.output,
        queue_wait_s=record.queue_wait_s,
        client_request_id=record.client_request_id,
        end_user=record.end_user,
        admitted=record.admitted,
    )
