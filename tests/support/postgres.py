"""A private, throwaway Postgres server on a free port, which a test may stop and start again.

The server refuses to run as root: as root, its folder belongs to the ``postgres`` user and
its programs run as that user (``runuser``); anyone else runs them as themselves.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from tests.support.servers import free_port


def _bindir() -> Path:
    """Debian's newest installed Postgres (``apt-get install postgresql``)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


BINDIR = _bindir()
USER = "hermes"


class PostgresServer:
    def __init__(self, bindir: Path = BINDIR) -> None:
        self.bindir = bindir
        self.port = free_port()
        # Not under pytest's tmp_path: its parents are closed to other users, postgres included.
        self.dir = Path(tempfile.mkdtemp(prefix="hermes-pg-"))
        self.data = self.dir / "data"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.dir, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", USER, "--no-sync", "-E", "UTF8")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bindir / program), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            log = self.dir / "log"
            raise RuntimeError(
                f"{program} failed: {result.stderr or result.stdout}\n{log.read_text() if log.exists() else ''}"
            )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def create_database(self) -> str:
        """A new, empty database of its own; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def remove(self) -> None:
        with contextlib.suppress(RuntimeError):  # already stopped
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
