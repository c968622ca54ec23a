from __future__ import annotations

import asyncio
import functools
import os
import signal
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from hermes_serve.config import Settings, load_settings
from hermes_serve.metrics import GatewayMetrics
from hermes_serve.reload import ConfigWatcher, needing_restart, watch
from tests.support.virtual import elapse

SHA = "b" * 64


def write(path: Path, keys: str, max_model_len: int = 2048) -> None:
    path.write_text(
        f"services:\n  hermes:\n    model: {{max_model_len: {max_model_len}}}\n    auth: {{keys: [{keys}]}}\n"
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "configuration.yaml"
    write(path, f"{{name: a, sha256: '{SHA}'}}")
    return path


def watcher_for(config: Path, applied: list[Settings], registry: CollectorRegistry) -> ConfigWatcher:
    environ = {"HERMES_CONFIG": str(config)}

    async def apply(settings: Settings) -> None:
        applied.append(settings)

    return ConfigWatcher(
        config, lambda: load_settings(environ), apply, load_settings(environ), GatewayMetrics(registry)
    )


def reloads(registry: CollectorRegistry, result: str) -> float:
    return registry.get_sample_value("hermes_config_reloads_total", {"result": result}) or 0


async def test_a_good_file_is_applied_and_a_bad_one_changes_nothing(
    config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    applied: list[Settings] = []
    registry = CollectorRegistry()
    watcher = watcher_for(config, applied, registry)
    write(config, f"{{name: a, sha256: '{SHA}'}}, {{name: b, sha256: '{SHA[:-1]}c', tokens_per_day: 9}}")
    assert await watcher.reload() is True
    assert [k.name for k in applied[-1].auth.keys] == ["a", "b"] and applied[-1].auth.keys[1].tokens_per_day == 9
    write(config, "{name: a, sha256: NOT-HEX}")
    assert await watcher.reload() is False
    assert len(applied) == 1 and reloads(registry, "ok") == 1 and reloads(registry, "error") == 1
    assert "services.hermes.auth.keys.0.sha256" in caplog.text and "the running keys stay" in caplog.text


async def test_settings_outside_auth_are_named_as_needing_a_restart(
    config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    applied: list[Settings] = []
    watcher = watcher_for(config, applied, CollectorRegistry())
    write(config, f"{{name: a, sha256: '{SHA}'}}", max_model_len=4096)
    assert await watcher.reload() is True
    assert "need a restart to apply: model.max_model_len" in caplog.text
    assert needing_restart(applied[0], applied[0]) == []
    adapters = applied[0].model_copy(
        update={"model": applied[0].model.model_copy(update={"adapters": [{"name": "x", "source": "/a"}]})}
    )
    assert needing_restart(applied[0], adapters) == [], "adapters reload"


async def test_the_file_is_watched_and_sighup_reloads(config: Path) -> None:
    load = functools.partial(load_settings, {"HERMES_CONFIG": str(config)})
    applied: asyncio.Queue[Settings] = asyncio.Queue()
    watcher = ConfigWatcher(config, load, applied.put, load(), GatewayMetrics(CollectorRegistry()))
    loop = asyncio.get_running_loop()
    stop = watch(watcher, interval_s=5)
    try:
        await elapse(16)  # three looks at the file, on virtual time
        assert applied.empty(), "an unchanged file is not reloaded"
        write(config, f"{{name: c, sha256: '{SHA}'}}")
        changed_at = loop.time()
        assert [k.name for k in (await applied.get()).auth.keys] == ["c"]
        assert loop.time() - changed_at == pytest.approx(4), "at the next look"
        os.kill(os.getpid(), signal.SIGHUP)
        await applied.get()
        assert applied.empty()
    finally:
        stop()
