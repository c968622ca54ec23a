"""A gateway with real policies (memory storage) in front of a fake engine, and a driver."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from hermes_serve.admission import AdmissionQueue
from hermes_serve.auth import KeyRing, hash_key
from hermes_serve.clock import WallClock, wall_time
from hermes_serve.config import Settings, parse_settings
from hermes_serve.gateway import Gateway
from hermes_serve.ledger import Ledger, MemoryLedger
from hermes_serve.limits import Limits
from hermes_serve.metrics import GatewayMetrics
from tests.support import asgi
from tests.support.asgi import Reply
from tests.support.fake_engine import FakeEngine

KEY = "hs-unit-test-key"


async def call(app: Any, method: str, path: str, body: Any = None, *, key: str | None = KEY, **options: Any) -> Reply:
    """One request with the test key (``key=None``: none)."""
    return await asgi.call(app, method, path, body, key=key, **options)


def build(
    engine: FakeEngine | None = None,
    *,
    registry: CollectorRegistry | None = None,
    wall_clock: WallClock = wall_time,
    ledger: Ledger | None = None,
    **overrides: Any,
) -> tuple[Gateway, FakeEngine, Settings]:
    config: dict[str, Any] = {
        "auth": {
            "keys": [{"name": "team", "sha256": hash_key(KEY), "requests_per_minute": 100, "tokens_per_minute": 100000}]
        },
        "admission": {"max_concurrency": 1, "max_queue": 1, "queue_timeout_s": 0.2, "request_timeout_s": 1.0},
        "server": {"max_body_bytes": 2048},
    }
    for section, values in overrides.items():
        config[section] = {**config.get(section, {}), **values}
    settings = parse_settings(config)
    engine = engine or FakeEngine()
    gateway = Gateway(
        settings,
        KeyRing.from_settings(settings.auth, {}),
        Limits(ledger or MemoryLedger(), settings.admission.request_timeout_s),
        AdmissionQueue(settings.admission.max_concurrency, settings.admission.max_queue),
        GatewayMetrics(registry or CollectorRegistry()),
        wall_clock=wall_clock,
    )
    gateway.attach(engine, ready=lambda: True)
    return gateway, engine, settings
