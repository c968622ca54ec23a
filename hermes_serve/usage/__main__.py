"""``python -m hermes_serve.usage``: usage per day or hour, by key, model or end user, read
from the usage store itself; ``python -m hermes_serve.usage limits``: every key's limits as
they stand in the shared limits storage."""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TextIO

from ..config import SettingsError, load_settings
from . import standing
from .reports import GROUPS, TABLE_HEADER, usage_table
from .store import LedgerError, SqliteStore, open_store


def _parse_time(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, now: float | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["limits"]:
        return standing.main()
    parser = argparse.ArgumentParser(prog="python -m hermes_serve.usage", description=__doc__)
    parser.add_argument("--store", help="sqlite:///path or postgresql://... (default: the configuration's usage.store)")
    parser.add_argument("--by", choices=("day", "hour"), default="day")
    parser.add_argument("--group", choices=tuple(GROUPS), default="key")
    parser.add_argument("--since", type=_parse_time, help="ISO 8601, UTC unless it names a zone (default: 7 days ago)")
    parser.add_argument("--until", type=_parse_time, help="ISO 8601 (default: now)")
    parser.add_argument("--csv", action="store_true", help="CSV with a header line")
    args = parser.parse_args(argv)
    out = out or sys.stdout
    until = args.until if args.until is not None else (now if now is not None else time.time())
    since = args.since if args.since is not None else until - timedelta(days=7).total_seconds()
    try:
        store = open_store(
            args.store if args.store is not None else load_settings(os.environ).usage_store_url(os.environ)
        )
        if store is None:
            raise LedgerError("the store is none: there is no ledger to read")
        if isinstance(store, SqliteStore) and not store.path.exists():
            raise LedgerError("no ledger at that path yet")
        try:
            table = usage_table(store, args.by, args.group, since, until)
        finally:
            store.close()
    except SettingsError as exc:
        print(f"hermes-serve: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bad URL, a store that does not answer: one line, no traceback
        print(f"hermes-serve: cannot read the usage ledger: {exc}", file=sys.stderr)
        return 1
    header = (TABLE_HEADER[0], *(("key", "end_user") if args.group == "user" else (args.group,)), *TABLE_HEADER[1:])
    if args.csv:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(table)
        return 0
    cells = [header, *((*(name or "-" for name in row[:-5]), *(str(n) for n in row[-5:])) for row in table)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip(), file=out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
