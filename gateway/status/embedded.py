"""Status in a small SQLite file in the data folder: zero set-up, shared by the gateway's
processes and its CLI on one machine."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from gateway.errors import StatusUnavailable
from gateway.normalise import as_utc
from gateway.sqlite_thread import SQLiteThread
from gateway.status import COUNTERS, Delta, StatusRecord, counters_from

SCHEMA = """
CREATE TABLE IF NOT EXISTS partner_counters (
    partner TEXT NOT NULL,
    name    TEXT NOT NULL,
    value   INTEGER NOT NULL,
    PRIMARY KEY (partner, name)
);
CREATE TABLE IF NOT EXISTS partner_success (
    partner         TEXT PRIMARY KEY,
    last_success_us INTEGER NOT NULL,
    last_success_at TEXT NOT NULL
);
"""


class EmbeddedStatusStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        # Status is bookkeeping: NORMAL sync is enough (survives a process crash).
        self._db = SQLiteThread(path, SCHEMA, StatusUnavailable, synchronous="NORMAL")

    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    async def ping(self) -> None:
        # Reads its tables: "SELECT 1" alone never touches the file, so proves nothing.
        await self._db.run(
            lambda conn: conn.execute(
                "SELECT (SELECT 1 FROM partner_counters LIMIT 1),"
                " (SELECT 1 FROM partner_success LIMIT 1)"
            ).fetchone()
        )

    async def record(
        self, partner: str, counts: Mapping[str, int], success_at: datetime | None = None
    ) -> None:
        def work(conn: sqlite3.Connection) -> None:
            _apply(conn, partner, counts, success_at)

        await self._db.transaction(work)

    async def record_batch(self, batch: Mapping[str, Delta], writer: str, seq: int) -> None:
        """One transaction for the whole batch. ``writer`` and ``seq`` are not needed here: the
        caller waits for the transaction's outcome (committed, or rolled back on error), so a
        batch is never in doubt as it is when a Redis reply is lost."""

        def work(conn: sqlite3.Connection) -> None:
            for partner, delta in batch.items():
                _apply(conn, partner, delta.counts, delta.success_at)

        await self._db.transaction(work)

    async def get(self, partner: str) -> StatusRecord:
        def work(conn: sqlite3.Connection) -> StatusRecord:
            rows = conn.execute(
                "SELECT name, value FROM partner_counters WHERE partner = ?", (partner,)
            ).fetchall()
            success = conn.execute(
                "SELECT last_success_at FROM partner_success WHERE partner = ?", (partner,)
            ).fetchone()
            values = {str(name): int(value) for name, value in rows if name in COUNTERS}
            return StatusRecord(
                last_success_at=datetime.fromisoformat(success[0]) if success else None,
                counters=counters_from(values),
            )

        return await self._db.run(work)


def _apply(
    conn: sqlite3.Connection, partner: str, counts: Mapping[str, int], success_at: datetime | None
) -> None:
    for name, n in counts.items():
        if n:
            conn.execute(
                "INSERT INTO partner_counters (partner, name, value) VALUES (?, ?, ?)"
                " ON CONFLICT (partner, name) DO UPDATE SET value = value + excluded.value",
                (partner, name, n),
            )
    if success_at is not None:
        moment = as_utc(success_at)
        # Only ever moves forward, whichever process writes last.
        conn.execute(
            "INSERT INTO partner_success VALUES (?, ?, ?) ON CONFLICT (partner) DO"
            " UPDATE SET last_success_us = excluded.last_success_us,"
            " last_success_at = excluded.last_success_at"
            " WHERE excluded.last_success_us > partner_success.last_success_us",
            (partner, int(moment.timestamp() * 1_000_000), moment.isoformat()),
        )
