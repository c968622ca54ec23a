"""The operators' view of limits, `python -m hermes_serve.usage limits`, run for real against the shared Redis."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from hermes_serve.auth import Principal
from hermes_serve.config import ApiKey
from hermes_serve.ledger import RedisLedger
from hermes_serve.limits import Limits
from tests.support.servers import REPO

SHA = "c" * 64


def run_cli(config: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_")} | {"HERMES_CONFIG": str(config)}
    return subprocess.run(
        [sys.executable, "-m", "hermes_serve.usage", "limits"], cwd=REPO, env=env, capture_output=True, text=True
    )


async def test_the_cli_shows_every_key_from_the_shared_storage(tmp_path: Path, redis_url: str) -> None:
    keys = [
        {"name": "cli-budget", "sha256": SHA, "tokens_per_day": 5000, "requests_per_minute": 9},
        {"name": "cli-free", "sha256": SHA, "enabled": False},
    ]
    config = tmp_path / "configuration.yaml"
    config.write_text(yaml.safe_dump({"services": {"hermes": {"limits_storage": redis_url, "auth": {"keys": keys}}}}))
    limits = Limits(RedisLedger(redis_url), 30)
    principal = Principal.of(ApiKey.model_validate(keys[0]))
    await limits.settle(await limits.admit(principal, 100), 1234)
    await limits.close()
    result = run_cli(config)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    day = next(line for line in lines if "tokens_per_day" in line).split()
    assert day[:5] == ["cli-budget", "tokens_per_day", "1234", "0", str(5000 - 1234)]
    assert any(line.startswith("cli-free") and "unlimited (disabled)" in line for line in lines)


def test_with_memory_storage_it_says_where_to_look(tmp_path: Path) -> None:
    config = tmp_path / "configuration.yaml"
    config.write_text(yaml.safe_dump({"services": {"hermes": {"auth": {"keys": [{"name": "a", "sha256": SHA}]}}}}))
    result = run_cli(config)
    assert result.returncode == 2 and "GET /v1/usage" in result.stderr and "Traceback" not in result.stderr
