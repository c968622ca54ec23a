"""A soak: steady mixed load for minutes, and the API process's memory, asyncio tasks and
/metrics series sampled as it runs. They must stay flat.

    ./scripts/bench soak [--minutes 10] [--rate 4]

The load (tests/support/load.py): answers, streams, clients that leave mid-stream, malformed
requests and a key held over its limit, at a bounded rate. ``--scripted`` soaks the
gateway alone, over the scripted engine. (CI's one-minute soak moved here: its bounds are
the last line's verdict.)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import secrets
import tempfile
import time
from pathlib import Path

import yaml

from hermes_serve.models import resolve_model_path
from tests.support import servers
from tests.support.load import mixed_load, series_count, worker_process
from tests.support.servers import REPO, Server


def start(workdir: Path, scripted: bool) -> Server:
    document = yaml.safe_load((REPO / "configuration.yaml").read_text())
    section = document["services"]["hermes"]
    if scripted:  # the gateway alone, over the scripted engine (answers as the embedded model)
        section["model"] = {**section.get("model", {}), "source": "fake://"}
    keys = {name: "hs-soak-" + secrets.token_urlsafe(16) for name in ("soak", "soak-limited")}
    section["auth"]["keys"] = [
        {"name": "soak", "sha256": hashlib.sha256(keys["soak"].encode()).hexdigest()},
        {
            "name": "soak-limited",
            "sha256": hashlib.sha256(keys["soak-limited"].encode()).hexdigest(),
            "requests_per_minute": 5,
        },
    ]
    servers.write_config(workdir / "configuration.yaml", section)
    if scripted:
        return servers.start(workdir / "configuration.yaml", workdir / "server", keys)
    store = Path(resolve_model_path(section["model"]["source"])).parents[1]
    return servers.start(workdir / "configuration.yaml", workdir / "server", keys, models=store)


def sample(server: Server) -> tuple[float, float, int]:
    return (
        worker_process(server).memory_info().rss / 2**20,
        server.metric("hermes_event_loop_tasks"),
        series_count(server),
    )


async def soak(server: Server, minutes: float, rate: float) -> None:
    await mixed_load(server, "soak", "soak-limited", seconds=30, rate_per_s=rate)  # warm-up: every kind once
    print(f"{'minute':>6} {'RSS MiB':>8} {'tasks':>6} {'series':>7} {'requests':>9}  statuses", flush=True)
    rss, tasks, series = first = sample(server)
    print(f"{0:>6} {rss:>8.0f} {tasks:>6.0f} {series:>7}", flush=True)
    for minute in range(1, int(minutes) + 1):
        tally = await mixed_load(server, "soak", "soak-limited", seconds=60, rate_per_s=rate)
        rss, tasks, series = sample(server)
        broken = len(tally.broken())
        print(f"{minute:>6} {rss:>8.0f} {tasks:>6.0f} {series:>7} {len(tally.outcomes):>9}  {tally.by_status()}"
              f"{f'  ({broken} broken)' if broken else ''}", flush=True)  # fmt: skip
    # What CI's one-minute soak used to assert, now a verdict of this benchmark.
    flat = rss - first[0] < 64 and tasks <= first[1] + 2 and series <= first[2] + 4
    print(f"flat (RSS +64 MiB, tasks +2, series +4 at most): {'yes' if flat else 'NO'}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=float, default=4, help="requests started per second")
    parser.add_argument("--scripted", action="store_true", help="the scripted engine (fake://): the gateway alone")
    options = parser.parse_args()
    server = start(Path(tempfile.mkdtemp(prefix="hermes-soak-")), options.scripted)
    try:
        ready = servers.wait_ready(server, time.monotonic() + 900)
        print(f"ready in {ready:.0f}s; soaking {options.minutes:g} min at {options.rate:g} requests/s", flush=True)
        asyncio.run(soak(server, options.minutes, options.rate))
    finally:
        servers.stop(server)


if __name__ == "__main__":
    main()
