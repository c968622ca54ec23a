"""The gateway's cost through the real server, over HTTP: `bentoml serve` with the scripted
engine (``fake://``) against the same scripted engine served alone, side by side in one run.

    ./scripts/bench http [--requests 2000] [--concurrency 1 16 64] [--stream]

Each arm gets the same requests from one client process (httpx, keep-alive connections), at
each concurrency: p50/p99 latency and requests per second. The difference is what the gateway
adds per request (keys, limits, admission, accounting, BentoML's server and middleware).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.support import servers
from tests.support.servers import REPO, Server

BODY = {
    "model": "scripted",
    "messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Tell me a joke."}],
    "max_tokens": 16,
}


def start_gateway(workdir: Path) -> Server:
    key = "hs-bench-" + secrets.token_urlsafe(16)
    section = {
        "model": {"source": "fake://", "served_name": "scripted"},
        "auth": {"keys": [{"name": "bench", "sha256": hashlib.sha256(key.encode()).hexdigest()}]},
        "admission": {"max_concurrency": 256, "max_queue": 256},
    }
    servers.write_config(workdir / "configuration.yaml", section)
    return servers.start(workdir / "configuration.yaml", workdir / "server", {"bench": key})


def start_alone(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = servers.free_port()
    log = (workdir / "alone.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "hermes_serve.fake_engine", "--port", str(port)],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ},
    )
    url = f"http://127.0.0.1:{port}"
    assert servers.wait_until(lambda: _answers(url), 60), "the scripted engine alone did not start"
    return process, url


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v1/models", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


async def measure(url: str, key: str | None, requests: int, concurrency: int, stream: bool) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {**BODY, "stream": stream}
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as http:

        async def one() -> None:
            started = time.perf_counter()
            if stream:
                async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    async for _ in response.aiter_bytes():
                        pass
            else:
                response = await http.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.status_code
            latencies.append(time.perf_counter() - started)

        async def client(count: int) -> None:
            for _ in range(count):
                await one()

        await asyncio.gather(*(client(10) for _ in range(concurrency)))  # warm-up
        latencies.clear()
        began = time.perf_counter()
        share, extra = divmod(requests, concurrency)
        await asyncio.gather(*(client(share + (i < extra)) for i in range(concurrency)))
        took = time.perf_counter() - began
    ordered = sorted(latencies)
    return {
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[int(len(ordered) * 0.99)] * 1000,
        "rps": len(ordered) / took,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--stream", action="store_true")
    options = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="hermes-bench-http-"))
    gateway = start_gateway(workdir)
    alone, alone_url = start_alone(workdir)
    try:
        servers.wait_ready(gateway, time.monotonic() + 120)
        print(f"{options.requests} requests per arm and concurrency, stream={options.stream}")
        print(f"{'concurrency':>11} {'arm':<16} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
        for concurrency in options.concurrency:
            base = asyncio.run(measure(alone_url, None, options.requests, concurrency, options.stream))
            ours = asyncio.run(
                measure(gateway.url, gateway.keys["bench"], options.requests, concurrency, options.stream)
            )
            for arm, figures in (("engine alone", base), ("through hermes", ours)):
                print(
                    f"{concurrency:>11} {arm:<16} {figures['p50_ms']:>8.2f} {figures['p99_ms']:>8.2f} {figures['rps']:>8.0f}"
                )
            print(f"{'':>11} {'added p50':<16} {ours['p50_ms'] - base['p50_ms']:>8.2f} ms")
    finally:
        servers.stop(gateway)
        alone.terminate()
        alone.wait(10)


if __name__ == "__main__":
    main()
