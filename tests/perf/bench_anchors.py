"""hermes-serve against both anchors, on one machine and the same weights: vLLM's own OpenAI
server, and the tutorial's scheme 1 (FastAPI + llama-cpp-python, scripts/baselines/).

    ./scripts/bench anchors [--reps 3] [--concurrency 1 8 16 32 64] [--out docs/benchmarks]
        [--arms hermes hermes-before hermes-preload hermes-no-preload vllm scheme1]

Each repetition starts every server fresh, in a rotated order (interleaved: no server always
runs first or last), and drives it with vLLM's serving benchmark: streaming chat, random
prompts of 128 tokens, 128 output tokens (`ignore_eos`, which scheme 1 honours too, so every
server writes the same tokens), max(16, concurrency) prompts per level.
Reports medians over the repetitions (output tok/s, TTFT p50/p99, TPOT p50, errors), the
memory of each server's process tree and its start-up time; writes results.json and two PNG
plots (tok/s and TTFT p50 against concurrency) to --out.

Scheme 1 reads the embedded GGUF itself (Q4_1); vLLM and hermes-serve serve the same weights
dequantised to bf16 (hermes_serve.models imports them from that file).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hermes_serve.config import load_settings
from hermes_serve.models import embedded_gguf, resolve_model_path
from tests.perf.bench_serving import run_client, start_hermes, start_vllm, tree_rss_gib
from tests.support import servers
from tests.support.servers import REPO, Server, free_port

METRICS = ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms")
# hermes-serve as configured; as it was before the per-token fix (BentoML's access log and
# OpenTelemetry spans on every chunk); with tcmalloc and Intel OpenMP preloaded, and without.
VARIANTS = {
    "hermes": {},
    "hermes-before": {
        "BENTOML_CONFIG_OPTIONS": "services.hermes.logging.access.enabled=true services.hermes.tracing.excluded_urls=^$"
    },
    "hermes-preload": {"HERMES_MODEL__CPU_PRELOAD": "true"},
    "hermes-no-preload": {"HERMES_MODEL__CPU_PRELOAD": "false"},
}


def start_scheme1(served_name: str, workdir: Path) -> Server:
    venv = subprocess.run([str(REPO / "scripts" / "baselines" / "setup")], capture_output=True, text=True, check=True)
    python = Path(venv.stdout.strip()) / "bin" / "python"
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "scheme1.log"
    env = {**os.environ, "SCHEME1_MODEL_PATH": str(embedded_gguf()), "SCHEME1_MODEL_NAME": served_name}
    process = subprocess.Popen(
        [str(python), str(REPO / "scripts" / "baselines" / "scheme1_server.py"), str(port)],
        env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    return Server(f"http://127.0.0.1:{port}", {}, log, process, ready_path="/health")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument(
        "--arms", nargs="+", default=["hermes", "vllm", "scheme1"], choices=[*VARIANTS, "vllm", "scheme1"]
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    options = parser.parse_args()

    settings = load_settings({"HERMES_CONFIG": str(REPO / "configuration.yaml")})
    model_path = resolve_model_path(settings.model.source)
    key = "hs-bench-" + secrets.token_urlsafe(16)
    workdir = Path(tempfile.mkdtemp(prefix="hermes-bench-anchors-"))
    starters: dict[str, Callable[[Path], Server]] = {
        "hermes": lambda d: start_hermes(key, d, environment=VARIANTS["hermes"]),
        "hermes-before": lambda d: start_hermes(key, d, environment=VARIANTS["hermes-before"]),
        "hermes-preload": lambda d: start_hermes(key, d, environment=VARIANTS["hermes-preload"]),
        "hermes-no-preload": lambda d: start_hermes(key, d, environment=VARIANTS["hermes-no-preload"]),
        "vllm": lambda d: start_vllm(model_path, d),
        "scheme1": lambda d: start_scheme1(settings.model.served_name, d),
    }
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in options.arms}
    for rep in range(options.reps):
        order = options.arms[rep % len(options.arms) :] + options.arms[: rep % len(options.arms)]
        for arm in order:
            print(f"[rep {rep + 1}/{options.reps}] {arm}: starting", flush=True)
            started = time.monotonic()
            server = starters[arm](workdir / f"{arm}-{rep}")
            try:
                ready_s = servers.wait_ready(server, time.monotonic() + 1200)
                run: dict[str, Any] = {"ready_s": time.monotonic() - started, "levels": {}}
                print(f"[rep {rep + 1}] {arm}: ready in {ready_s:.0f}s", flush=True)
                for level in options.concurrency:
                    result = run_client(
                        server.url,
                        model=settings.model.served_name,
                        tokenizer=model_path,
                        concurrency=level,
                        prompts=max(16, level),
                        key=key if arm.startswith("hermes") else None,
                        output_len=128,
                    )
                    run["levels"][level] = {m: result[m] for m in METRICS} | {"failed": result.get("failed", 0)}
                    print(
                        f"[rep {rep + 1}] {arm} c={level}: {result['output_throughput']:.1f} tok/s, "
                        f"TTFT p50 {result['median_ttft_ms']:.0f} ms, failed {result.get('failed', 0)}",
                        flush=True,
                    )
                run["rss_gib"] = tree_rss_gib(server)
                runs[arm].append(run)
            finally:
                servers.stop(server)
    report(runs, options.concurrency, options.out, workdir)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(runs: dict[str, list[dict[str, Any]]], levels: list[int], out: Path, workdir: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table: dict[str, dict[str, Any]] = {}
    for arm, reps in runs.items():
        table[arm] = {
            "ready_s": median([r["ready_s"] for r in reps]),
            "rss_gib": median([r["rss_gib"] for r in reps]),
            "levels": {
                level: {m: median([r["levels"][level][m] for r in reps]) for m in (*METRICS, "failed")}
                for level in levels
            },
            "reps": reps,
        }
    (out / "results.json").write_text(json.dumps(table, indent=1, default=str))
    print(f"\nmedians of {len(next(iter(runs.values())))} repetitions; logs in {workdir}")
    print(f"{'server':<8} {'conc':>4} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'failed':>6}")
    for arm, row in table.items():
        for level in levels:
            m = row["levels"][level]
            print(
                f"{arm:<8} {level:>4} {m['output_throughput']:>8.1f} {m['median_ttft_ms']:>9.0f} "
                f"{m['p99_ttft_ms']:>9.0f} {m['median_tpot_ms']:>9.1f} {m['failed']:>6.0f}"
            )
    for arm, row in table.items():
        print(f"{arm:<8} ready in {row['ready_s']:.0f}s, memory {row['rss_gib']:.2f} GiB")
    (out / "results.md").write_text(markdown(table, levels))
    plot(table, levels, out)


def markdown(table: dict[str, dict[str, Any]], levels: list[int]) -> str:
    """The medians as Markdown tables, and each server's ratios to the others (for the docs)."""
    arms = list(table)
    lines = [
        "| server | concurrency | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | failed |",
        "|---" * 7 + "|",
    ]
    for arm in arms:
        for level in levels:
            m = table[arm]["levels"][level]
            lines.append(
                f"| {arm} | {level} | {m['output_throughput']:.1f} | {m['median_ttft_ms']:.0f} | "
                f"{m['p99_ttft_ms']:.0f} | {m['median_tpot_ms']:.2f} | {m['failed']:.0f} |"
            )
    lines += ["", "| server | ready in s | memory GiB |", "|---|---|---|"]
    lines += [f"| {arm} | {row['ready_s']:.0f} | {row['rss_gib']:.2f} |" for arm, row in table.items()]
    for base in ("vllm", "scheme1"):
        if base not in table:
            continue
        lines += [
            "",
            f"Against {base} (ratios of tok/s, TTFT p50 and TPOT p50, each as times better: above 1 is better):",
            "",
        ]
        lines += ["| server | " + " | ".join(f"c={level}" for level in levels) + " |", "|---" * (len(levels) + 1) + "|"]
        for arm in arms:
            if arm == base:
                continue
            cells = []
            for level in levels:
                m, b = table[arm]["levels"][level], table[base]["levels"][level]
                cells.append(
                    f"{m['output_throughput'] / b['output_throughput']:.2f} · "
                    f"{b['median_ttft_ms'] / m['median_ttft_ms']:.2f} · {b['median_tpot_ms'] / m['median_tpot_ms']:.3f}"
                )
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict[str, dict[str, Any]], levels: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for metric, label, name, log in [
        ("output_throughput", "output tokens/s (higher is better)", "throughput.png", False),
        ("median_ttft_ms", "time to first token, p50, ms (lower is better; log scale)", "ttft.png", True),
    ]:
        figure, axes = plt.subplots(figsize=(7, 4.2))
        for arm, row in table.items():
            axes.plot(levels, [row["levels"][level][metric] for level in levels], marker="o", label=arm)
        axes.set_xscale("log", base=2)
        axes.set_xticks(levels, [str(level) for level in levels])
        if log:
            axes.set_yscale("log")
        axes.set_xlabel("concurrent streaming clients")
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(out / name, dpi=110)
        plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
