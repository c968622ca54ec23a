"""Per-request cost of the gateway (auth + body + limits + admission + accounting), measured
side by side against calling the same instant fake engine directly, in one run.

    $(./scripts/setup)/bin/python scripts/bench_gateway.py [--requests 20000] [--stream]

Reports p50/p99 in microseconds per request and the gateway's added cost. No engine, no
network: this isolates the gateway's own work, which happens once per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import CollectorRegistry  # noqa: E402

from hermes_serve.admission import AdmissionQueue  # noqa: E402
from hermes_serve.auth import KeyRing, hash_key  # noqa: E402
from hermes_serve.config import parse_settings  # noqa: E402
from hermes_serve.gateway import Gateway  # noqa: E402
from hermes_serve.limits import RateLimits  # noqa: E402
from hermes_serve.metrics import GatewayMetrics  # noqa: E402
from tests.unit.fake_engine import FakeEngine  # noqa: E402

KEY = "hs-bench"
BODY = {
    "model": "fake",
    "messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Tell me a joke " * 20}],
    "max_tokens": 64,
}


async def one(app: Any, payload: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers, "query_string": b""}
    sent = False
    done = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    await app(scope, receive, send)


async def measure(app: Any, n: int, body: dict[str, Any]) -> list[float]:
    payload = json.dumps(body).encode()
    headers = [(b"authorization", f"Bearer {KEY}".encode()), (b"content-type", b"application/json")]
    for _ in range(min(1000, n)):
        await one(app, payload, headers)  # warm-up
    samples = []
    for _ in range(n):
        started = time.perf_counter_ns()
        await one(app, payload, headers)
        samples.append((time.perf_counter_ns() - started) / 1000)
    return samples


def gateway_for(engine: FakeEngine) -> Gateway:
    settings = parse_settings({
        "auth": {"keys": [{"name": "bench", "sha256": hash_key(KEY), "requests_per_minute": 10**9, "tokens_per_minute": 10**12}]},
        "admission": {"max_concurrency": 64, "max_queue": 50},
    })  # fmt: skip
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
