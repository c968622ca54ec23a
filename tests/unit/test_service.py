"""The BentoML configuration service.py gives the service (read back as BentoML resolves it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESOLVE = """
import json, service
from bentoml._internal.configuration.containers import BentoMLContainer as c
service.HermesService.inject_config()
excluded = c.tracing_excluded_urls.get()
print(json.dumps({
    "access_log": c.api_server_config.logging.access.enabled.get(),
    "traced": {p: not excluded.url_disabled("http://h:3000" + p) for p in ("/v1/chat/completions", "/v1/responses", "/readyz", "/metrics")},
}))
"""


def resolve(options: str = "") -> dict[str, object]:
    env = {
        **os.environ,
        "HERMES_CONFIG": str(REPO / "configuration.yaml"),
        "BENTOML_CONFIG": str(REPO / "configuration.yaml"),
    }
    env["BENTOML_CONFIG_OPTIONS"] = options
    out = subprocess.run([sys.executable, "-c", RESOLVE], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_streams_skip_bentoml_access_log_and_per_chunk_spans_and_a_config_file_can_turn_them_back() -> None:
    assert resolve() == {
        "access_log": False,
        "traced": {"/v1/chat/completions": False, "/v1/responses": False, "/readyz": True, "/metrics": True},
    }
    restored = resolve("services.hermes.logging.access.enabled=true services.hermes.tracing.excluded_urls=^$")
    assert restored["access_log"] is True and all(restored["traced"].values())  # type: ignore[attr-defined]
