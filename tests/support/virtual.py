"""Waiting in unit tests, which run on virtual time (tests/unit/conftest.py): for a state,
with no time passing, or for time itself to pass, which takes none."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

TURNS = 100


async def until(condition: Callable[[], bool], turns: int = TURNS) -> None:
    """Let the other tasks run until ``condition`` holds; it must, within ``turns`` turns of
    the event loop and with no time passing."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)  # one turn of the loop: no timer, so no time passes
    raise AssertionError(f"not reached in {turns} turns of the event loop")


async def elapse(seconds: float) -> None:
    """Let ``seconds`` of the event loop's time pass: at once on virtual time; refused on
    real time, where it would be a real sleep."""
    if not getattr(asyncio.get_running_loop(), "looptime_on", False):
        raise RuntimeError("elapse() is for tests on virtual time (looptime) only")
    await asyncio.sleep(seconds)
