"""Where the API process spends its time per streamed token: hermes-serve and vLLM's own server,
each sampled by py-spy while one client streams (concurrency 1, 128-token answers).

    ./scripts/bench profile [--seconds 40] [--py-spy PATH] [--arms hermes vllm]

py-spy is not one of the project's dependencies (`pip install py-spy` anywhere; pass its path).
Samples the API process only (BentoML's worker; vLLM's api_server), not the engine core, and
prints, for each server, the share of its samples under each layer a token passes through
(BentoML's middlewares, OpenTelemetry, Starlette, uvicorn, our gateway, vLLM's serving and
output processing), the on-CPU share of the process, and writes each raw profile (collapsed
stacks) to the work directory.
"""

from __future__ import annotations

import argparse
import collections
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from hermes_serve.config import load_settings
from hermes_serve.models import resolve_model_path
from tests.perf.bench_serving import run_client, start_hermes, start_vllm
from tests.support import servers
from tests.support.load import worker_process
from tests.support.servers import REPO, Server

# A sample is counted under the first of these found in its stack, innermost first.
LAYERS = {
    "opentelemetry": "OpenTelemetry ASGI middleware",
    "bentoml/_internal/server/http/access": "BentoML access log",
    "bentoml/_internal/server/http/instruments": "BentoML metrics middleware",
    "bentoml/_internal/server/http/traffic": "BentoML timeout middleware",
    "_bentoml_impl/server/app": "BentoML app",
    "hermes_serve/": "hermes-serve gateway",
    "starlette/": "Starlette",
    "uvicorn/": "uvicorn",
    "vllm/v1/engine/output_processor": "vLLM output processing",
    "vllm/entrypoints": "vLLM serving",
    "vllm/": "vLLM (other)",
    "asyncio/": "asyncio",
}


def api_process(arm: str, server: Server) -> psutil.Process:
    return worker_process(server) if arm == "hermes" else psutil.Process(server.process.pid)


def layer(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for needle, name in LAYERS.items():
            if needle in frame:
                return name
    return "other"


def summarise(collapsed: Path) -> tuple[int, collections.Counter[str]]:
    shares: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        shares[layer(stack)] += int(count)
    return total, shares


def profile(arm: str, server: Server, py_spy: str, seconds: int, workdir: Path, client: dict[str, object]) -> None:
    servers.wait_ready(server, time.monotonic() + 900)
    process = api_process(arm, server)
    run_client(server.url, concurrency=1, prompts=4, **client)  # warm-up: compile, caches
    out = workdir / f"{arm}.collapsed"
    spy = subprocess.Popen(
        [py_spy, "record", "--pid", str(process.pid), "--duration", str(seconds), "--rate", "200",
         "--format", "raw", "--output", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    cpu_before, started = process.cpu_times(), time.monotonic()
    stop = threading.Event()

    def drive() -> None:
        while not stop.is_set():
            run_client(server.url, concurrency=1, prompts=4, **client)

    driver = threading.Thread(target=drive)
    driver.start()
    spy.wait()
    cpu_after, elapsed = process.cpu_times(), time.monotonic() - started
    stop.set()
    driver.join()
    if not out.exists():
        sys.exit(f"py-spy wrote nothing: {spy.stderr.read().decode() if spy.stderr else ''}")
    busy = (cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system) / elapsed
    total, shares = summarise(out)
    print(f"\n{arm}: API process on CPU {busy:.0%} of the time; {total} samples ({out})")
    for name, count in shares.most_common():
        print(f"  {name:<32} {count / total:6.1%}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=40)
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "")
    parser.add_argument("--arms", nargs="+", default=["hermes", "vllm"])
    options = parser.parse_args()
    if not options.py_spy or not os.access(options.py_spy, os.X_OK):
        sys.exit("py-spy not found: pip install py-spy, then --py-spy PATH")

    settings = load_settings({"HERMES_CONFIG": str(REPO / "configuration.yaml")})
    model_path = resolve_model_path(settings.model.source)
    key = "hs-bench-" + secrets.token_urlsafe(16)
    workdir = Path(tempfile.mkdtemp(prefix="hermes-profile-"))
    for arm in options.arms:
        server = start_hermes(key, workdir / arm) if arm == "hermes" else start_vllm(model_path, workdir)
        client = {"model": settings.model.served_name, "tokenizer": model_path, "key": key if arm == "hermes" else None}
        try:
            profile(arm, server, options.py_spy, options.seconds, workdir, client | {"output_len": 128})
        finally:
            servers.stop(server)


if __name__ == "__main__":
    main()
