"""Per-request cost of the gateway (auth + body + limits + admission + accounting), measured
side by side against calling the same instant fake engine directly, in one run.

    ./scripts/bench gateway [--requests 20000] [--stream] [--chunks 64]
    ./scripts/bench gateway --storage redis --volumes 100000 1000000 10000000 --requests 2000

Reports p50/p99 in microseconds per request and the gateway's added cost. No engine, no
network: this isolates the gateway's own work, which happens once per request. With
``--volumes``, the key's limits are counted in the chosen storage (a private redis-server
for ``redis``) after charging it that many tokens in the current minute first, so the cost
is measured at that volume: it must not grow with it.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from hermes_serve.admission import AdmissionQueue
from hermes_serve.auth import KeyRing, Principal, hash_key
from hermes_serve.config import parse_settings
from hermes_serve.gateway import Gateway
from hermes_serve.ledger import ledger_for
from hermes_serve.limits import Limits
from hermes_serve.metrics import GatewayMetrics
from tests.support.asgi import call
from tests.support.fake_engine import FakeEngine
from tests.support.redis import RedisServer

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


def gateway_for(engine: FakeEngine, storage: str, name: str, tokens_per_minute: int) -> tuple[Gateway, Limits]:
    settings = parse_settings(
        {
            "auth": {
                "keys": [
                    {
                        "name": name,
                        "sha256": hash_key(KEY),
                        "requests_per_minute": 10**9,
                        "tokens_per_minute": tokens_per_minute,
                    }
                ]
            },
            "admission": {"max_concurrency": 64, "max_queue": 50},
        }
    )
    limits = Limits(ledger_for(storage), settings.admission.request_timeout_s)
    gateway = Gateway(
        settings,
        KeyRing.from_settings(settings.auth, {}),
        limits,
        AdmissionQueue(64, 50),
        GatewayMetrics(CollectorRegistry()),
    )
    gateway.attach(engine, ready=lambda: True)
    return gateway, limits


async def charge(limits: Limits, principal: Principal, tokens: int) -> None:
    """Put ``tokens`` in the key's current minute, as a key at that volume would have."""
    await limits.settle(await limits.admit(principal, 1), tokens)


def summary(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.99)]


async def run(args: argparse.Namespace, storage: str) -> None:
    engine = FakeEngine(delay_s=0.0, chunks=args.chunks)
    body = {**BODY, "stream": args.stream}
    direct = await measure(engine, args.requests, body)
    d50, d99 = summary(direct)
    print(
        f"requests: {args.requests} per arm, stream={args.stream}, chunks={args.chunks if args.stream else 1}, storage={args.storage}"
    )
    print(f"fake engine alone : p50 {d50:8.1f} us   p99 {d99:8.1f} us")
    for volume in args.volumes or [None]:
        name = f"bench-{time.monotonic_ns()}"
        gateway, limits = gateway_for(engine, storage, name, 10**12 if volume is None else 2 * volume)
        if volume is not None:
            await charge(limits, gateway.keyring.authenticate(f"Bearer {KEY}") or Principal(name), volume)
        through = await measure(gateway, args.requests, body)
        g50, g99 = summary(through)
        label = "" if volume is None else f" at {volume:>10,} tokens/min"
        print(
            f"through gateway{label}: p50 {g50:8.1f} us   p99 {g99:8.1f} us   cost p50 {g50 - d50:8.1f} us, p99 {g99 - d99:8.1f} us"
        )
        await limits.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--stream", action="store_true", help="stream chunks instead of one JSON body")
    parser.add_argument("--chunks", type=int, default=3, help="chunks per stream (per-token cost shows as the slope)")
    parser.add_argument("--storage", choices=["memory", "redis"], default="memory")
    parser.add_argument("--volumes", type=int, nargs="*", help="tokens already charged this minute, one run each")
    args = parser.parse_args()
    if args.storage == "memory":
        return await run(args, "memory://")
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("--storage redis needs redis-server (apt-get install redis-server)")
    redis = RedisServer(binary, Path(tempfile.mkdtemp(prefix="hermes-bench-redis-")))
    redis.start()
    try:
        await run(args, redis.url)
    finally:
        redis.stop()


if __name__ == "__main__":
    asyncio.run(main())
