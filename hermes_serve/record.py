"""One record of what happened to a request, and the one place it becomes metrics and a log line."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from . import errors
from .metrics import GatewayMetrics

logger = logging.getLogger("hermes_serve.access")


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
    client_request_id: str | None = None
    """The client's own id for the request (``X-Client-Request-Id``), beside ours; never the engine's."""


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
