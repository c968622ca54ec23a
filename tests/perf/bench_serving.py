"""hermes-serve (BentoML + gateway + in-process vLLM) against vLLM's own OpenAI server, side
by side in one run: same model, same engine flags, same client (vLLM's serving benchmark).

    ./scripts/bench serving [--concurrency 1 8 32] [--prompts 64]

The two servers run one after the other (never together: they would share the cores), each
started fresh. Reports output tokens/s, TTFT and TPOT per concurrency, hermes/vLLM ratios, and
the resident memory of each server's process tree after the run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from hermes_serve.config import load_settings
from hermes_serve.engine import engine_cli_args, engine_environment
from hermes_serve.models import resolve_model_path
from tests.support import servers
from tests.support.servers import REPO, Server, free_port

METRICS = ("output_throughput", "median_ttft_ms", "median_tpot_ms")


def start_vllm(model_path: str, workdir: Path, environment: dict[str, str] | None = None) -> Server:
    """vLLM's own server with the service's engine flags, as its users start it: nothing
    preloaded. ``environment`` is added last."""
    settings = load_settings({"HERMES_CONFIG": str(REPO / "configuration.yaml"), "HERMES_MODEL__CPU_PRELOAD": "false"})
    port = free_port()
    argv = [*engine_cli_args(settings, model_path), "--port", str(port), "--host", "127.0.0.1"]
    env = {**os.environ, **engine_environment(settings), **(environment or {})}
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "vllm.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *argv],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Server(f"http://127.0.0.1:{port}", {}, log, process, ready_path="/health")


def start_hermes(
    key: str, workdir: Path, adapters: list[dict[str, str]] | None = None, environment: dict[str, str] | None = None
) -> Server:
    # The shipped configuration with one key whose limits cannot bind, and room for every client.
    document = yaml.safe_load((REPO / "configuration.yaml").read_text())
    section = document["services"]["hermes"]
    section["auth"]["keys"] = [{"name": "bench", "sha256": hashlib.sha256(key.encode()).hexdigest()}]
    section["admission"].update(max_concurrency=256, max_queue=256)
    if adapters:
        section["model"].update(adapters=adapters, max_lora_rank=8)
    workdir.mkdir(parents=True, exist_ok=True)
    servers.write_config(workdir / "configuration.yaml", section)
    # Its own BentoML home (metrics), sharing the user's model store.
    store = Path(resolve_model_path(section["model"]["source"])).parents[1]
    return servers.start(
        workdir / "configuration.yaml", workdir / "hermes", {"bench": key}, models=store, environment=environment
    )


def tree_rss_gib(server: Server) -> float:
    return sum(p.memory_info().rss for p in servers.process_tree(server) if p.is_running()) / 2**30


def accept_crlf_events() -> None:
    """vLLM's benchmark client splits server-sent events on "\\n\\n" only. Scheme 1's
    sse_starlette ends them with "\\r\\n\\r\\n" (as valid): two events that arrived in one
    read were never parsed, and the answer counted as failed or short. Line endings are
    made one before the client splits; servers that send "\\n\\n" see no change."""
    from vllm.benchmarks.lib import endpoint_request_func as client

    base = client.StreamedResponseHandler
    if getattr(base, "accepts_crlf", False):
        return

    class Handler(base):  # type: ignore[misc, valid-type]
        accepts_crlf = True

        def add_chunk(self, chunk_bytes: bytes) -> list[str]:
            self.buffer = (self.buffer + self._decoder.decode(chunk_bytes)).replace("\r\n", "\n")
            return list(super().add_chunk(b""))

    client.StreamedResponseHandler = Handler  # type: ignore[misc]


def run_client(
    base_url: str, model: str, tokenizer: str, concurrency: int, prompts: int, key: str | None, output_len: int = 64
) -> dict[str, Any]:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    accept_crlf_events()

    if key:
        os.environ["OPENAI_API_KEY"] = key  # the benchmark client sends it as a Bearer token
    else:
        os.environ.pop("OPENAI_API_KEY", None)
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(
        [
            "--backend",
            "openai-chat",
            "--endpoint",
            "/v1/chat/completions",
            "--base-url",
            base_url,
            "--model",
            model,
            "--tokenizer",
            tokenizer,
            "--dataset-name",
            "random",
            "--random-input-len",
            "128",
            "--random-output-len",
            str(output_len),
            "--ignore-eos",
            "--num-prompts",
            str(prompts),
            "--max-concurrency",
            str(concurrency),
            "--seed",
            "0",
            # The client asks with max_completion_tokens; the tutorial's scheme 1 reads only
            # max_tokens (and would write up to its default of 1 024): every server gets both.
            "--extra-body",
            json.dumps({"max_tokens": output_len}),
        ]
    )
    return main(args)


def bench(name: str, server: Server, **client: Any) -> dict[str, Any]:
    try:
        ready_s = servers.wait_ready(server, time.monotonic() + 900)
        results = {c: run_client(server.url, concurrency=c, **client) for c in client.pop("levels")}
        return {"ready_s": ready_s, "rss_gib": tree_rss_gib(server), "results": results}
    finally:
        servers.stop(server)
        print(f"{name}: stopped", file=sys.stderr)


def main_cli() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--hermes-first", action="store_true", help="run hermes first (to see order effects)")
    options = parser.parse_args()

    settings = load_settings({"HERMES_CONFIG": str(REPO / "configuration.yaml")})
    model_path = resolve_model_path(settings.model.source)
    name = settings.model.served_name
    client = {"model": name, "tokenizer": model_path, "prompts": options.prompts}
    key = "hs-bench-" + secrets.token_urlsafe(16)
    workdir = Path(tempfile.mkdtemp(prefix="hermes-bench-"))

    def run_vllm() -> dict[str, Any]:
        return bench("vllm", start_vllm(model_path, workdir), levels=options.concurrency, key=None, **client)

    def run_hermes() -> dict[str, Any]:
        return bench("hermes", start_hermes(key, workdir), levels=options.concurrency, key=key, **client)

    if options.hermes_first:
        hermes, vllm = run_hermes(), run_vllm()
    else:
        vllm, hermes = run_vllm(), run_hermes()

    order = "hermes, then vLLM" if options.hermes_first else "vLLM, then hermes"
    print(f"\nrandom 128 in / 64 out, {options.prompts} prompts per level, {order}; logs in {workdir}")
    print(
        f"{'conc':>4} | {'vLLM tok/s':>10} {'hermes tok/s':>12} {'ratio':>6} | "
        f"{'TTFT p50 ms':>16} | {'TPOT p50 ms':>16}"
    )
    for level in options.concurrency:
        v, h = vllm["results"][level], hermes["results"][level]
        print(
            f"{level:>4} | {v['output_throughput']:>10.1f} {h['output_throughput']:>12.1f} "
            f"{h['output_throughput'] / v['output_throughput']:>6.2f} | "
            f"{v['median_ttft_ms']:>7.0f} {h['median_ttft_ms']:>8.0f} | "
            f"{v['median_tpot_ms']:>7.1f} {h['median_tpot_ms']:>8.1f}"
        )
    print(f"ready after   : vLLM {vllm['ready_s']:.0f}s, hermes {hermes['ready_s']:.0f}s")
    print(
        f"memory (RSS)  : vLLM {vllm['rss_gib']:.2f} GiB, hermes {hermes['rss_gib']:.2f} GiB "
        f"({hermes['rss_gib'] / vllm['rss_gib']:.2f}x)"
    )


if __name__ == "__main__":
    main_cli()
