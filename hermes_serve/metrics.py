"""Gateway metrics, exported on BentoML's ``/metrics`` beside vLLM's ``vllm:*`` series.

Labelled by key *name* (never the key), route and outcome. A registry is injectable so unit
tests do not share global state.
"""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.requests = Counter(
            "hermes_requests",
            "Requests answered, by key, route and status.",
            ["key", "route", "status"],
            registry=registry,
        )
        self.rejections = Counter(
            "hermes_rejections",
            "Requests refused by the gateway, by key and reason.",
            ["key", "reason"],
            registry=registry,
        )
        self.tokens = Counter(
            "hermes_tokens", "Prompt + completion tokens charged, by key.", ["key"], registry=registry
        )
        self.duration = Histogram(
            "hermes_request_duration_seconds",
            "Whole request time, queue included.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "hermes_queue_wait_seconds",
            "Time spent waiting for an engine slot.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.running = Gauge(
            "hermes_running_requests",
            "Requests holding an engine slot.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.config_reloads = Counter(
            "hermes_config_reloads",
            "Reloads of the configuration file's keys, by result (ok, or error: the running keys stay).",
            ["result"],
            registry=registry,
        )
        self.limits_storage_up = Gauge(
            "hermes_limits_storage_up",
            "Whether the shared storage of keys' limits answers (1) or not (0).",
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.limits_storage_up.set(1)
        self.engine_restarts = Counter(
            "hermes_engine_restarts", "Times the engine died and was started again in-process.", registry=registry
        )
        self.event_loop_tasks = Gauge(
            "hermes_event_loop_tasks",
            "asyncio tasks alive in the API process (sampled every few seconds).",
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.waiting = Gauge(
            "hermes_waiting_requests",
            "Requests waiting in the admission queue.",
            registry=registry,
            multiprocess_mode="livesum",
        )

        self.usage_queue = Gauge(
            "hermes_usage_queue_rows",
            "Usage rows recorded and not yet in the usage store (in memory or in the spill file).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.usage_rows_written = Counter(
            "hermes_usage_rows_written", "Usage rows committed to the usage store.", registry=registry
        )
        self.usage_write_failures = Counter(
            "hermes_usage_write_failures", "Batches the usage store did not take (kept and retried).", registry=registry
        )
        self.usage_rows_spilled = Counter(
            "hermes_usage_rows_spilled",
            "Usage rows appended to the local spill file while the store was down or slow.",
            registry=registry,
        )


async def sample_event_loop(gauge: Gauge, interval_s: float = 5.0) -> None:
    """Keep ``gauge`` at the number of asyncio tasks alive (a leak shows as a slope)."""
    while True:
        gauge.set(len(asyncio.all_tasks()))
        await asyncio.sleep(interval_s)
