"""CPU per stored row on SQLite with random (version-4) and time-ordered (version-7) event ids.

    python bench/store_ids.py [--rows 30000] [--group 5,20]

Stores the same rows through the gateway's own schema and multi-row INSERT
(``gateway.storage.sqlite._insert``, synchronous=FULL, WAL) in groups of ``--group`` rows, as
group commit does under load, once with each kind of id, and prints wall and CPU time per row.
The only difference between the two runs is where a new id lands in the unique index on
``event_id``: anywhere (random) or at its end (time first).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway.ids import new_event_id  # noqa: E402
from gateway.storage.migrations import migrate_sqlite  # noqa: E402
from gateway.storage.sqlite import _insert  # noqa: E402


def random_id() -> str:
    return uuid.uuid4().hex


def measure(make_id: Callable[[], str], rows: int, group: int, folder: Path) -> tuple[float, float]:
    path = folder / f"{make_id.__name__}-{group}.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    migrate_sqlite(conn, str(path))
    body = os.urandom(700)  # about an encoded event with its raw payload
    received = "2026-12-04T10:00:00.000000+00:00"
    batch = [
        (make_id(), "kochava", f"txn:{os.urandom(10).hex()}", "install", 1, received, body)
        for _ in range(rows)
    ]
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, rows, group):
        _insert(conn, batch[start : start + group])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    (stored,) = conn.execute("SELECT count(*) FROM events").fetchone()
    conn.close()
    if stored != rows:
        raise SystemExit(f"{stored} of {rows} rows stored")
    return wall / rows * 1e6, cpu / rows * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--group", default="5,20", help="rows per INSERT, e.g. 5,20")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:  # on the disk the data folder uses
        print(f"{'ids':<14}{'rows/INSERT':>12}{'wall µs/row':>13}{'CPU µs/row':>12}")
        for group in (int(g) for g in args.group.split(",")):
            for make_id, name in ((random_id, "random (v4)"), (new_event_id, "time (v7)")):
                wall, cpu = measure(make_id, args.rows, group, Path(tmp))
                print(f"{name:<14}{group:>12}{wall:>13.1f}{cpu:>12.1f}")


if __name__ == "__main__":
    main()
