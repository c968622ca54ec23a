"""A private redis-server on a free port, which a test may stop, start again, or slow down."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from tests.support.servers import free_port


class RedisServer:
    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self._workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self._workdir),
                "--enable-debug-command",  # DEBUG SLEEP: a Redis that answers slowly
                "local",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start")

    def command(self, *args: str) -> str:
        """One command through redis-cli (beside the service's own connections)."""
        cli = Path(self.binary).with_name("redis-cli")
        result = subprocess.run([str(cli), "-p", str(self.port), *args], capture_output=True, text=True, timeout=60)
        return result.stdout.strip()

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None
