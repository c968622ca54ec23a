"""SIGHUP at BentoML's supervisor is passed on to the service's workers, never a restart."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import pytest
from circus.sighandler import SysHandler

from hermes_serve.supervisor import forward_sighup


class Watcher:
    def __init__(self, name: str, pids: list[int]) -> None:
        self.name, self.processes, self.signals = name, dict.fromkeys(pids), []

    def send_signal(self, pid: int, signum: int) -> None:
        self.signals.append((pid, signum))


class Controller:
    def __init__(self, watchers: list[Watcher]) -> None:
        self.arbiter = self
        self.watchers = watchers
        self.loop = self
        self.dispatched: list[Any] = []

    def iter_watchers(self) -> list[Watcher]:
        return self.watchers

    def add_callback_from_signal(self, callback: Callable[..., None], *args: Any) -> None:
        callback(*args)

    def dispatch(self, *args: Any) -> None:  # circus's restart-everything path
        self.dispatched.append(args)


def test_sighup_reaches_the_service_workers_and_nothing_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SysHandler, "handle_hup", SysHandler.handle_hup)  # undone after the test
    service, other = Watcher("service", [11, 12]), Watcher("prom_server", [13])
    controller = Controller([service, other])
    handler = SysHandler.__new__(SysHandler)
    handler.controller = controller
    forward_sighup()
    handler.handle_hup()
    assert service.signals == [(11, signal.SIGHUP), (12, signal.SIGHUP)]
    assert other.signals == [] and controller.dispatched == []
