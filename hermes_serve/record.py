"""One record of what happened to a request, and the one place it becomes metrics and a log line."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from . import errors
from .metrics import GatewayMetrics

logger = logging.getLogger("hermes_serve.access")

# Outcomes that are the gateway refusing or cutting a request, by their error codes.
REFUSALS = frozenset(
    {
        "invalid_api_key",
        "rate_limit_exceeded",
        "server_overloaded",
        "queue_timeout",
        "request_timeout",
        errors.CLIENT_CLOSED_REQUEST,
    }
)


@dataclass
class Record:
    request_id: str
    method: str
    route: str
    """The route's pattern, or "other": a bounded label set for metrics and the log."""
    started: float
    key: str = "unknown"
    status: int | None = None
    outcome: str = "ok"
    """"ok", or the code of the error the request ended with."""
    tokens: int | None = None
    """Tokens charged to the key (generation routes only)."""


def observe(record: Record, metrics: GatewayMetrics, duration_s: float) -> None:
    metrics.requests.labels(record.key, record.route, str(record.status)).inc()
    metrics.duration.labels(record.route).observe(duration_s)
    if record.outcome in REFUSALS:
        metrics.rejections.labels(record.key, record.outcome).inc()
    if record.tokens is not None:
        metrics.tokens.labels(record.key).inc(record.tokens)
    # Key name and numbers only: never the key, never prompt text.
    logger.info(
        "id=%s key=%s %s %s status=%s outcome=%s tokens=%s duration_ms=%.0f",
        record.request_id,
        record.key,
        record.method,
        record.route,
        record.status,
        record.outcome,
        record.tokens,
        duration_s * 1000,
    )
