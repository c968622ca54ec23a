"""The unit tier runs on virtual time (looptime): asyncio's clock, which every deadline and
duration of the gateway reads (``hermes_serve.clock``), moves only when nothing is left to
run, straight to the next timer. A test of a time limit takes none of it, and what it
measures is exact.

Tests that talk to a real server (Redis) keep real time: their client's socket timeouts are
loop timers too, and virtual time would fire them before any reply could arrive."""

from __future__ import annotations

from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent
REAL_SERVERS = frozenset({"redis_server"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        uses = set(getattr(item, "fixturenames", ()))
        if item.path.is_relative_to(UNIT) and not uses & REAL_SERVERS and item.get_closest_marker("looptime") is None:
            # A test's or module's own mark (looptime(False) for a real socket) decides.
            item.add_marker(pytest.mark.looptime)
