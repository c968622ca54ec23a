"""Per-request cost of the gateway (auth + body + limits + admission + accounting), measured
side by side against calling the same instant fake engine directly, in one run.

    ./scripts/bench gateway [--requests 20000] [--stream] [--chunks 64]

Reports p50/p99 in microseconds per request and the gateway's added cost. No engine, no
network: this isolates the gateway's own work, which happens once per request.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from prometheus_client import CollectorRegistry

from hermes_serve.admission import AdmissionQueue
from hermes_serve.auth import KeyRing, hash_key
from hermes_serve.config import parse_settings
from hermes_serve.gateway import Gateway
from hermes_serve.limits import RateLimits
from hermes_serve.metrics import GatewayMetrics
from tests.support.asgi import call
from tests.support.fake_engine import FakeEngine

KEY = "hs-bench"
BODY = {
    "model": "fake",
    "messages": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Tell me a joke " * 20},
    ],
    "max_tokens": 64,
}


async def measure(app: Any, n: int, body: dict[str, Any]) -> list[float]:
    for _ in range(min(1000, n)):
        await call(app, "POST", "/v1/chat/completions", body, key=KEY)  # warm-up
    samples = []
    for _ in range(n):
        started = time.perf_counter_ns()
        await call(app, "POST", "/v1/chat/completions", body, key=KEY)
        samples.append((time.perf_counter_ns() - started) / 1000)
    return samples


def gateway_for(engine: FakeEngine) -> Gateway:
    settings = parse_settings(
        {
            "auth": {
                "keys": [
                    {
                        "name": "bench",
                        "sha256": hash_key(KEY),
                        "requests_per_minute": 10**9,
                        "tokens_per_minute": 10**12,
                    }
                ]
            },
            "admission": {"max_concurrency": 64, "max_queue": 50},
        }
    )
    gateway = Gateway(
        settings,
        KeyRing.from_settings(settings.auth, {}),
        RateLimits("memory://"),
        AdmissionQueue(64, 50),
        GatewayMetrics(CollectorRegistry()),
    )
    gateway.attach(engine, ready=lambda: True)
    return gateway


def summary(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.99)]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--stream", action="store_true", help="stream chunks instead of one JSON body")
    parser.add_argument("--chunks", type=int, default=3, help="chunks per stream (per-token cost shows as the slope)")
    args = parser.parse_args()
    engine = FakeEngine(delay_s=0.0, chunks=args.chunks)
    body = {**BODY, "stream": args.stream}
    direct = await measure(engine, args.requests, body)
    through = await measure(gateway_for(engine), args.requests, body)
    (d50, d99), (g50, g99) = summary(direct), summary(through)
    print(f"requests: {args.requests} per arm, stream={args.stream}, chunks={args.chunks if args.stream else 1}")
    print(f"fake engine alone : p50 {d50:8.1f} us   p99 {d99:8.1f} us")
    print(f"through gateway   : p50 {g50:8.1f} us   p99 {g99:8.1f} us")
    print(f"gateway cost      : p50 {g50 - d50:8.1f} us per request ({g50 / d50:.1f}x the bare call)")


if __name__ == "__main__":
    asyncio.run(main())
