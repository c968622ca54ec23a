"""The priority experiment: one request's time to first token from a high-priority key and
from one of a low-priority flood's priority, alternately, while the flood overfills the KV
cache (moved here from the e2e tier: a ratio measured side by side, not a CI verdict).

    ./scripts/bench priority [--rounds 3]

A server of its own: a deliberately small KV cache (28 MiB, about 1 200 tokens of
SmolLM2-135M), room for a flood in its engine and its queue. Prints the TTFTs, their medians,
the preemptions, and whether the high-priority median is under half the other's (the bound
docs/isolation.md states).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import secrets
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hermes_serve.models import resolve_model_path
from tests.support import servers
from tests.support.servers import Server, wait_until

SERVED_NAME = "smollm2-135m-instruct"
KEYS = {"batch": -5, "peer": -5, "interactive": 5}  # name: priority
KV_CACHE_BYTES = 28 * 2**20
CONTEXT = 1024


def start(workdir: Path) -> Server:
    keys = {name: "hs-priority-" + secrets.token_urlsafe(16) for name in KEYS}
    section = {
        "device": "cpu",
        "model": {
            "served_name": SERVED_NAME,
            "max_model_len": CONTEXT,
            "cpu_kvcache_space_gib": None,
            "engine_args": ["--kv-cache-memory-bytes", str(KV_CACHE_BYTES)],
        },
        "auth": {
            "keys": [
                {"name": name, "sha256": hashlib.sha256(keys[name].encode()).hexdigest(), "priority": priority}
                for name, priority in KEYS.items()
            ]
        },
        "admission": {"max_concurrency": 40, "max_queue": 40, "request_timeout_s": 120},
    }
    servers.write_config(workdir / "configuration.yaml", section)
    store = Path(resolve_model_path(f"{SERVED_NAME}:latest")).parents[1]
    return servers.start(workdir / "configuration.yaml", workdir / "server", keys, models=store)


# Many short generations (about twelve fit in the isolated server's KV cache, the rest wait, a
# place frees every few steps) and a few long ones, which outgrow the cache and get preempted.
# Each stream is sent again as soon as it ends: the backlog lasts as long as the experiment,
# however slowly a loaded machine lets the test observe it.
SHORT, LONG = 24, 6
FLOOD = SHORT + LONG
ROUNDS = 3  # TTFTs per key, alternating, under one flood: medians are compared


def flood_body(max_tokens: int) -> dict[str, Any]:
    return {
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": "Write a long story about ships."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "priority": -1000,  # the flood tries to promote itself: the gateway replaces both
    }


PROMOTE = {"X-Vllm-Priority": "-1000"}


@contextlib.contextmanager
def flooding(server: Server) -> Iterator[None]:
    stop = threading.Event()

    def one(max_tokens: int) -> None:
        with server.http("batch") as http:
            while not stop.is_set():
                with http.stream("POST", "/v1/chat/completions", json=flood_body(max_tokens), headers=PROMOTE) as r:
                    for _ in r.iter_lines():
                        if stop.is_set():
                            return

    threads = [threading.Thread(target=one, args=(300 if i < LONG else 60,)) for i in range(FLOOD)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)


def time_to_first_token(server: Server, key: str) -> float:
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "stream": True}
    started = time.monotonic()
    with server.http(key) as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                return time.monotonic() - started
    raise AssertionError("no token")


def experiment(isolated: Server, rounds: int) -> dict[str, Any]:
    """TTFT of one request from a high-priority key and from one of the flood's priority,
    alternately, each sent while a low-priority flood overfills the KV cache."""
    assert wait_until(isolated.idle, 120)
    before = isolated.metric("vllm:num_preemptions_total")

    def cache_full() -> bool:
        # A good part of the flood waits for room, and the long generations, to grow, have
        # pushed others out. One scrape: both at the same instant.
        scrape = isolated.scrape()
        return (
            scrape.value("vllm:num_requests_waiting") >= FLOOD // 3
            and scrape.value("vllm:num_preemptions_total") > before
        )

    ttfts: dict[str, list[float]] = {"interactive": [], "peer": []}
    with flooding(isolated):
        for _ in range(rounds):
            for key, times in ttfts.items():
                assert wait_until(cache_full, 180), "the flood did not fill the KV cache"
                times.append(time_to_first_token(isolated, key))
        preempted = isolated.metric("vllm:num_preemptions_total") - before
    ttft_high, ttft_equal = statistics.median(ttfts["interactive"]), statistics.median(ttfts["peer"])
    return {
        "ttft_priority_s": round(ttft_high, 2),
        "ttft_equal_s": round(ttft_equal, 2),
        "ttfts_priority_s": [round(t, 2) for t in ttfts["interactive"]],
        "ttfts_equal_s": [round(t, 2) for t in ttfts["peer"]],
        "preemptions": preempted,
        "priority_under_half": ttft_high < ttft_equal / 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    options = parser.parse_args()
    server = start(Path(tempfile.mkdtemp(prefix="hermes-priority-")))
    try:
        servers.wait_ready(server, time.monotonic() + 900)
        print(json.dumps(experiment(server, options.rounds), indent=2))
    finally:
        servers.stop(server)


if __name__ == "__main__":
    main()
