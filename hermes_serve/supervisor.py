"""SIGHUP to ``bentoml serve`` reloads keys, not the worker.

BentoML's process supervisor (circus) answers SIGHUP by restarting every worker: the engine
would stop, take minutes to start again, and cut every running stream. Operators send SIGHUP
(``kill -HUP``, ``docker kill --signal HUP``) to the supervisor, the process they started.
``forward_sighup`` makes the supervisor pass the signal on to the service's workers instead,
which reload their keys (``reload.ConfigWatcher``) and keep serving.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

logger = logging.getLogger(__name__)


# Registered in patches.py as "circus-sighup", "tornado-signal-callback" and "bentoml-watcher-names".
def forward_sighup() -> None:
    """Patch circus's signal handler (in the supervisor process; harmless elsewhere)."""
    try:
        from circus.sighandler import SysHandler
    except ImportError:  # not under BentoML's supervisor
        return

    def handle_hup(handler: Any) -> None:
        controller = handler.controller
        controller.loop.add_callback_from_signal(_signal_workers, controller.arbiter)

    SysHandler.handle_hup = handle_hup


def _signal_workers(arbiter: Any) -> None:
    for watcher in arbiter.iter_watchers():
        # BentoML's watchers for services: "service", or "service_<name>" with dependencies.
        if watcher.name == "service" or watcher.name.startswith("service_"):
            for pid in list(watcher.processes):
                logger.info("SIGHUP: asking worker %s to reload its keys", pid)
                watcher.send_signal(pid, signal.SIGHUP)
