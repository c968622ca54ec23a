"""The one source of time: injected everywhere so tests control it exactly."""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]
"""Returns seconds on a monotonic scale."""

monotonic: Clock = time.monotonic
