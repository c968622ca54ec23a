"""Keys that change without a restart: the configuration file is read again when it changes
(polled every few seconds, as Kubernetes updates a mounted ConfigMap in place) or on SIGHUP.

What reloads is ``auth`` (keys, their limits, budgets, priorities, caps, models, expiry) and
``model.adapters`` (when LoRA was on at start); a change elsewhere (model, engine,
admission...) is logged as needing a restart. A file that does not load changes nothing:
the running keys stay, the reason is logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .config import Settings, SettingsError
from .metrics import GatewayMetrics

logger = logging.getLogger(__name__)


class ConfigWatcher:
    def __init__(
        self,
        path: Path,
        load: Callable[[], Settings],
        apply: Callable[[Settings], Awaitable[None]],
        running: Settings,
        metrics: GatewayMetrics,
    ) -> None:
        self._path = path
        self._load = load
        self._apply = apply
        self._running = running
        self._metrics = metrics
        self._seen = self._fingerprint()

    async def reload(self, reason: str = "SIGHUP") -> bool:
        """Read the file now; returns whether new keys were applied."""
        self._seen = self._fingerprint()
        try:
            settings = self._load()
        except SettingsError as exc:
            logger.error("configuration not reloaded (%s), the running keys stay: %s", reason, exc)
            self._metrics.config_reloads.labels("error").inc()
            return False
        restart = needing_restart(self._running, settings)
        if restart:
            logger.warning("changed settings need a restart to apply: %s", ", ".join(restart))
        await self._apply(settings)
        self._running = settings
        self._metrics.config_reloads.labels("ok").inc()
        return True

    async def watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            if self._fingerprint() != self._seen:
                await self.reload("file changed")

    def _fingerprint(self) -> bytes | None:
        # The content, not the modification time: a ConfigMap update swaps a symlink, and
        # some editors keep mtimes.
        try:
            return hashlib.sha256(self._path.read_bytes()).digest()
        except OSError:
            return None


RELOADED: dict[str, Any] = {"auth": True, "model": {"adapters"}}


def needing_restart(running: Settings, new: Settings) -> list[str]:
    """Dotted names of the settings that differ and are not reloaded."""
    before, after = running.model_dump(exclude=RELOADED), new.model_dump(exclude=RELOADED)
    changed = []
    for section, value in after.items():
        if isinstance(value, dict):
            changed += [f"{section}.{k}" for k, v in value.items() if before[section].get(k) != v]
        elif before.get(section) != value:
            changed.append(section)
    return changed


def watch(watcher: ConfigWatcher, interval_s: float) -> Callable[[], None]:
    """Reload on SIGHUP and, every ``interval_s`` (0: never), when the file changed; returns
    the function that stops both."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):  # no signals off the main thread
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(watcher.reload()))
    task = loop.create_task(watcher.watch(interval_s)) if interval_s > 0 else None

    def stop() -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGHUP)
        if task is not None:
            task.cancel()

    return stop
