"""One record of what happened to a request, what it is charged, and the one place the record
becomes metrics and a log line."""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from . import errors
from .apis import Meter
from .metrics import GatewayMetrics

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
    tokens: int | None = None
    """Tokens charged to the key (generation routes only)."""
    client_request_id: str | None = None
    """The client's own id for the request (``X-Client-Request-Id``), beside ours; never the engine's."""

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


def charge(meter: Meter, fate: Fate, prompt_tokens: Callable[[], int]) -> int:
    """The tokens a generation is charged: what the engine reported using; else, for one the
    engine ran but which was cut short (so it reported nothing), its prompt estimate and the
    tokens already streamed, or leaving early would be a way around the key's limits; else
    none. ``prompt_tokens`` is only worked out for a request cut short."""
    if meter.tokens is not None:
        return meter.tokens
    if fate is Fate.RAN:
        return prompt_tokens() + meter.token_events
    return 0


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
