"""Decode speed with LoRA on and off, side by side in one run (vLLM's serving benchmark).

    ./scripts/bench lora [--concurrency 1 8] [--prompts 32]

On CPU, vLLM 0.32 turns torch.compile off when LoRA is enabled, so adapters stay off unless
configured: this measures what turning them on costs the base model, and what a request to
an adapter (a tiny rank-8 one, written here) costs beside it.
"""

from __future__ import annotations

import argparse
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from hermes_serve.config import load_settings
from hermes_serve.models import resolve_model_path
from tests.perf.bench_serving import run_client, start_hermes, tree_rss_gib
from tests.support import servers
from tests.support.lora import write_adapter
from tests.support.servers import REPO


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompts", type=int, default=32)
    options = parser.parse_args()
    settings = load_settings({"HERMES_CONFIG": str(REPO / "configuration.yaml")})
    model_path = resolve_model_path(settings.model.source)
    workdir = Path(tempfile.mkdtemp(prefix="hermes-bench-lora-"))
    adapter = write_adapter(Path(model_path), workdir / "adapter", b_scale=1.0)
    key = "hs-bench-" + secrets.token_urlsafe(16)
    client = {"tokenizer": model_path, "prompts": options.prompts, "key": key}
    rows: dict[str, dict[int, Any]] = {}
    for label, adapters in [("LoRA off", None), ("LoRA on", [{"name": "tiny", "source": str(adapter)}])]:
        server = start_hermes(key, workdir / label.replace(" ", "-"), adapters)
        try:
            ready = servers.wait_ready(server, time.monotonic() + 900)
            print(f"{label}: ready in {ready:.0f}s", flush=True)
            models = [(f"{label}, base model", settings.model.served_name)]
            if adapters:
                models.append((f"{label}, adapter", "tiny"))
            for name, model in models:
                rows[name] = {
                    c: run_client(server.url, model=model, concurrency=c, **client) for c in options.concurrency
                }
            print(f"{label}: memory {tree_rss_gib(server):.2f} GiB", flush=True)
        finally:
            servers.stop(server)
    print(f"\nrandom 128 in / 64 out, {options.prompts} prompts per level; logs in {workdir}")
    print(f"{'arm':<26} {'conc':>4} {'tok/s':>8} {'TTFT p50 ms':>12} {'TPOT p50 ms':>12}")
    for name, results in rows.items():
        for level, r in results.items():
            print(
                f"{name:<26} {level:>4} {r['output_throughput']:>8.1f} {r['median_ttft_ms']:>12.0f} {r['median_tpot_ms']:>12.1f}"
            )


if __name__ == "__main__":
    main()
