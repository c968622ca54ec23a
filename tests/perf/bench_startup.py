"""Start-up to ready, cold and warm, and recovery after the engine dies: for this service and
for vLLM's own server, with and without the compile-cache fix (hermes_serve/vllm_patches.py).

    ./scripts/bench startup

"Cold" starts with an empty vLLM cache directory (VLLM_CACHE_ROOT), "warm" starts again with
what the cold start left there. Without the fix every start compiles the model again.
"""

from __future__ import annotations

import argparse
import os
import secrets
import tempfile
import time
from pathlib import Path

import httpx

from hermes_serve.config import load_settings
from hermes_serve.models import resolve_model_path
from hermes_serve.vllm_patches import PLUGINS_PATH
from tests.perf.bench_serving import start_hermes, start_vllm
from tests.support import servers
from tests.support.servers import REPO, Server, process_tree, wait_until

WITHOUT_FIX = {"VLLM_PLUGINS": "lora_filesystem_resolver"}  # an allowlist that leaves ours out


def timed_start(kind: str, with_fix: bool, cache: Path, workdir: Path, key: str) -> tuple[float, Server]:
    environment = {"VLLM_CACHE_ROOT": str(cache), **({} if with_fix else WITHOUT_FIX)}
    started = time.monotonic()
    if kind == "vllm":
        if with_fix:  # how the service makes vLLM's processes find the plugin, for the bare server
            environment["PYTHONPATH"] = os.pathsep.join([str(PLUGINS_PATH), str(REPO)])
        settings = load_settings({"HERMES_CONFIG": str(REPO / "configuration.yaml")})
        server = start_vllm(resolve_model_path(settings.model.source), workdir, environment)
    else:
        server = start_hermes(key, workdir, environment=environment)
    servers.wait_ready(server, time.monotonic() + 1200)
    return time.monotonic() - started, server


def recovery(server: Server) -> float:
    """Kill the engine core; seconds until the service is ready again (it restarts in-process)."""
    (core,) = [p for p in process_tree(server) if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())]
    killed = time.monotonic()
    core.kill()
    assert wait_until(lambda: not ready(server), 30)
    assert wait_until(lambda: ready(server), 1200)
    return time.monotonic() - killed


def ready(server: Server) -> bool:
    try:
        return httpx.get(server.url + server.ready_path, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    root = Path(tempfile.mkdtemp(prefix="hermes-bench-startup-"))
    key = "hs-bench-" + secrets.token_urlsafe(16)
    rows = []
    for kind in ("vllm", "hermes"):
        for with_fix in (False, True):
            cache = root / f"{kind}-{'fix' if with_fix else 'nofix'}-cache"
            figures: dict[str, float] = {}
            for start in ("cold", "warm"):
                took, server = timed_start(kind, with_fix, cache, root / f"{kind}-{with_fix}-{start}", key)
                figures[start] = took
                if kind == "hermes" and start == "warm":
                    figures["recovery"] = recovery(server)
                servers.stop(server)
                print(f"{kind:<6} fix={with_fix!s:<5} {start}: {took:.0f}s", flush=True)
            rows.append((kind, with_fix, figures))
    print(f"\nstart-up to ready (s); logs in {root}")
    print(f"{'server':<8} {'fix':<5} {'cold':>6} {'warm':>6} {'engine death to ready':>22}")
    for kind, with_fix, f in rows:
        print(f"{kind:<8} {with_fix!s:<5} {f['cold']:>6.0f} {f['warm']:>6.0f} {f.get('recovery', float('nan')):>22.0f}")


if __name__ == "__main__":
    main()
