"""Edit the configuration file the e2e servers share, and wait until each has reloaded it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import yaml

from tests.support.servers import Server, wait_until


def reloads(server: Server, result: str = "ok") -> float:
    return server.metric("hermes_config_reloads_total", result=result)


# The file is polled every RELOAD_INTERVAL_S; the bound is for a slow, busy machine.
RELOAD_WAIT_S = 30


@contextmanager
def edited(servers: tuple[Server, ...], change: Any, result: str = "ok") -> Iterator[float]:
    """Edit the shared configuration file with ``change(section)``; wait until every server
    has reloaded it; restore it afterwards. Yields the seconds the reload took."""
    config = servers[0].config
    assert config is not None
    original = config.read_text()
    document = yaml.safe_load(original)
    change(document["services"]["hermes"])
    before = [reloads(s, result) for s in servers]
    started = time.monotonic()
    config.write_text(yaml.safe_dump(document))
    try:
        assert wait_until(
            lambda: all(reloads(s, result) > b for s, b in zip(servers, before, strict=True)), RELOAD_WAIT_S
        )
        yield time.monotonic() - started
    finally:
        before = [reloads(s) for s in servers]
        config.write_text(original)
        assert wait_until(lambda: all(reloads(s) > b for s, b in zip(servers, before, strict=True)), RELOAD_WAIT_S)
