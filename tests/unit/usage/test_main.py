"""The operators' CLI, ``python -m hermes_serve.usage``."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

from hermes_serve.usage.__main__ import main
from hermes_serve.usage.store import (
    SqliteStore,
)
from tests.support.servers import REPO
from tests.support.usage import (
    MIXED,
    Backend,
    Ledgers,
)


async def test_the_cli_reads_the_store(backend: Backend, ledgers: Ledgers) -> None:
    ledger = await ledgers()
    for r in MIXED:
        ledger.record(r)
    assert await ledger.flush()
    window = ["--since", "2026-12-04T00:00:00Z", "--until", "2026-12-05T00:00:00"]

    out = io.StringIO()
    assert main(["--store", backend.url, "--by", "hour", "--group", "model", "--csv", *window], out=out) == 0
    lines = list(csv.reader(io.StringIO(out.getvalue())))
    assert lines == [
        ["period", "model", "requests", "errors", "input_tokens", "cached_input_tokens", "output_tokens"],
        ["2026-12-04T10:00Z", "", "1", "1", "0", "0", "0"],
        ["2026-12-04T10:00Z", "m1", "4", "2", "30", "12", "12"],
        ["2026-12-04T10:00Z", "m2", "1", "0", "100", "0", "50"],
        ["2026-12-04T11:00Z", "m1", "1", "0", "10", "4", "5"],
    ]

    out = io.StringIO()
    assert main(["--store", backend.url, "--group", "user", "--csv", *window], out=out) == 0
    users = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [(u["period"], u["key"], u["end_user"], u["requests"]) for u in users] == [
        ("2026-12-04", "app", "", "3"),
        ("2026-12-04", "app", "user-1", "1"),
        ("2026-12-04", "app", "user-2", "1"),
        ("2026-12-04", "other", "user-1", "1"),
        ("2026-12-04", "unknown", "", "1"),
    ]

    out = io.StringIO()
    assert main(["--store", backend.url, *window], out=out) == 0
    table = [line.split() for line in out.getvalue().splitlines()]
    assert table == [
        ["period", "key", "requests", "errors", "input_tokens", "cached_input_tokens", "output_tokens"],
        ["2026-12-04", "app", "5", "2", "130", "12", "62"],
        ["2026-12-04", "other", "1", "0", "10", "4", "5"],
        ["2026-12-04", "unknown", "1", "1", "0", "0", "0"],
    ]


def test_the_cli_runs_as_a_module(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "usage.db")
    store.write(MIXED)
    store.close()
    command = [sys.executable, "-m", "hermes_serve.usage", "--store", f"sqlite:///{tmp_path / 'usage.db'}"]
    result = subprocess.run(
        [*command, "--since", "2026-12-01", "--until", "2026-12-31", "--csv"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].startswith("2026-12-04,app,5,2,130,12,62")
    missing = subprocess.run(
        [sys.executable, "-m", "hermes_serve.usage", "--store", f"sqlite:///{tmp_path / 'none.db'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 1 and "no ledger at" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "none.db").exists()
