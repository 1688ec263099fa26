"""SQLite storage: the embedded default. One file, WAL mode, every commit synced to disk.

All database work runs on one dedicated thread per process, so the event loop never blocks on
disk. Several processes may share the file; SQLite's write lock and the unique index on
``(partner, dedupe_key)`` keep concurrent retries to one stored event.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from gateway.errors import StorageUnavailable
from gateway.events import AttributionEvent, event_decoder, event_encoder
from gateway.sqlite_thread import SQLiteThread
from gateway.storage import (
    PURGED_DEVICE_IDS,
    PURGED_RAW,
    KeyRecord,
    Purged,
    ReplaceResult,
    StoreResult,
    replacement,
    scrubbed,
)
from gateway.storage.migrations import migrate_sqlite


class SQLiteStorage:
    def __init__(self, path: Path) -> None:
        self.path = path
        # The schema comes from the migrations (gateway/storage/migrations.py), run in open().
        self._db = SQLiteThread(path, "", StorageUnavailable, synchronous="FULL")
        self._run = self._db.run

    async def open(self) -> None:
        await self._db.open()
        try:
            await self._db.transaction(lambda conn: migrate_sqlite(conn, str(self.path)))
        except BaseException:
            await self._db.close()
            raise

    async def close(self) -> None:
        await self._db.close()

    async def ping(self) -> None:
        # Reads both tables: "SELECT 1" alone never touches the file, so proves nothing.
        await self._run(
            lambda conn: conn.execute(
                "SELECT (SELECT 1 FROM events LIMIT 1), (SELECT 1 FROM api_keys LIMIT 1)"
            ).fetchone()
        )

    async def store(self, events: Sequence[AttributionEvent]) -> list[StoreResult]:
        rows = [
            (
                e.event_id,
                e.partner,
                e.dedupe_key,
                e.kind,
                int(e.attributed),
                e.received_at.isoformat() if e.received_at else "",
                event_encoder.encode(e),
            )
            for e in events
        ]

        def work(conn: sqlite3.Connection) -> list[StoreResult]:
            results: list[StoreResult] = []
            for row in rows:
                cur = conn.execute(
                    "INSERT INTO events (event_id, partner, dedupe_key, kind, attributed,"
                    " received_at, body) VALUES (?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (partner, dedupe_key) DO NOTHING",
                    row,
                )
                if cur.rowcount == 1:
                    results.append(StoreResult(stored=True, event_id=row[0]))
                else:
                    (existing,) = conn.execute(
                        "SELECT event_id FROM events WHERE partner = ? AND dedupe_key = ?",
                        (row[1], row[2]),
                    ).fetchone()
                    results.append(StoreResult(stored=False, event_id=existing))
            return results

        # Group commit: stores arriving together share one transaction and one fsync, each in
        # its own savepoint; answered only once that transaction is committed.
        return await self._db.grouped(work, one_statement=len(rows) == 1)

    async def events(self, partner: str | None = None, limit: int = 50) -> list[AttributionEvent]:
        def work(conn: sqlite3.Connection) -> list[bytes]:
            if partner is None:
                cur = conn.execute("SELECT body FROM events ORDER BY seq DESC LIMIT ?", (limit,))
            else:
                cur = conn.execute(
                    "SELECT body FROM events WHERE partner = ? ORDER BY seq DESC LIMIT ?",
                    (partner, limit),
                )
            return [row[0] for row in cur.fetchall()]

        return [event_decoder.decode(body) for body in await self._run(work)]

    async def count(self, partner: str | None = None) -> int:
        def work(conn: sqlite3.Connection) -> int:
            if partner is None:
                row = conn.execute("SELECT count(*) FROM events").fetchone()
            else:
                row = conn.execute(
                    "SELECT count(*) FROM events WHERE partner = ?", (partner,)
                ).fetchone()
            return int(row[0])

        return await self._run(work)

    async def replace(self, events: Sequence[AttributionEvent]) -> list[ReplaceResult]:
        def work(conn: sqlite3.Connection) -> list[ReplaceResult]:
            results: list[ReplaceResult] = []
            for e in events:
                # BEGIN IMMEDIATE holds the write lock: nobody inserts between SELECT and INSERT.
                found = conn.execute(
                    "SELECT event_id, body FROM events WHERE partner = ? AND dedupe_key = ?",
                    (e.partner, e.dedupe_key),
                ).fetchone()
                if found is None:
                    conn.execute(
                        "INSERT INTO events (event_id, partner, dedupe_key, kind, attributed,"
                        " received_at, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            e.event_id,
                            e.partner,
                            e.dedupe_key,
                            e.kind,
                            int(e.attributed),
                            e.received_at.isoformat() if e.received_at else "",
                            event_encoder.encode(e),
                        ),
                    )
                    results.append(ReplaceResult(outcome="stored", event_id=e.event_id))
                    continue
                new = replacement(e, event_decoder.decode(found[1]))
                if new is None:
                    results.append(ReplaceResult(outcome="unchanged", event_id=found[0]))
                    continue
                conn.execute(  # a re-map brings the raw payload back: due for retention again
                    "UPDATE events SET kind = ?, attributed = ?, body = ?, purged = 0"
                    " WHERE event_id = ?",
                    (new.kind, int(new.attributed), event_encoder.encode(new), found[0]),
                )
                results.append(ReplaceResult(outcome="updated", event_id=found[0]))
            return results

        return await self._db.transaction(work)

    async def find(self, partner: str, dedupe_keys: Sequence[str]) -> dict[str, AttributionEvent]:
        keys = list(dict.fromkeys(dedupe_keys))

        def work(conn: sqlite3.Connection) -> list[bytes]:
            bodies: list[bytes] = []
            for start in range(0, len(keys), 500):  # SQLite caps the number of parameters
                chunk = keys[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                cur = conn.execute(
                    f"SELECT body FROM events WHERE partner = ? AND dedupe_key IN ({marks})",  # noqa: S608
                    (partner, *chunk),
                )
                bodies += [row[0] for row in cur.fetchall()]
            return bodies

        found = [event_decoder.decode(body) for body in await self._run(work)]
        return {e.dedupe_key: e for e in found}

    async def scan(
        self, partner: str | None = None, after: str | None = None, limit: int = 500
    ) -> list[AttributionEvent]:
        def work(conn: sqlite3.Connection) -> list[bytes]:
            # An unknown ``after`` compares with NULL: no rows, never a restart from the first.
            sql = "SELECT body FROM events WHERE seq > "
            sql += "0" if after is None else "(SELECT seq FROM events WHERE event_id = ?)"
            args: list[str | int] = [] if after is None else [after]
            if partner is not None:
                sql += " AND partner = ?"
                args.append(partner)
            cur = conn.execute(sql + " ORDER BY seq LIMIT ?", (*args, limit))
            return [row[0] for row in cur.fetchall()]

        return [event_decoder.decode(body) for body in await self._run(work)]

    async def add_key(self, record: KeyRecord, key_hash: str) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO api_keys (key_id, partner, key_hash, hint, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    record.key_id,
                    record.partner,
                    key_hash,
                    record.hint,
                    record.created_at.isoformat(),
                ),
            )

        await self._run(work)

    async def active_key_hashes(self, partner: str) -> list[tuple[str, str]]:
        def work(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            cur = conn.execute(
                "SELECT key_id, key_hash FROM api_keys WHERE partner = ? AND revoked_at IS NULL",
                (partner,),
            )
            return [(str(a), str(b)) for a, b in cur.fetchall()]

        return await self._run(work)

    async def keys(self, partner: str | None = None) -> list[KeyRecord]:
        def work(conn: sqlite3.Connection) -> list[KeyRecord]:
            sql = "SELECT key_id, partner, hint, created_at, revoked_at, last_used_at FROM api_keys"
            args: tuple[str, ...] = ()
            if partner is not None:
                sql += " WHERE partner = ?"
                args = (partner,)
            cur = conn.execute(sql + " ORDER BY created_at, key_id", args)
            return [
                KeyRecord(
                    key_id=r[0],
                    partner=r[1],
                    hint=r[2],
                    created_at=datetime.fromisoformat(r[3]),
                    revoked_at=datetime.fromisoformat(r[4]) if r[4] else None,
                    last_used_at=datetime.fromisoformat(r[5]) if r[5] else None,
                )
                for r in cur.fetchall()
            ]

        return await self._run(work)

    async def revoke_key(self, key_id: str, at: datetime) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (at.isoformat(), key_id),
            )
            return cur.rowcount == 1

        return await self._run(work)

    async def touch_key(self, key_id: str, at: datetime) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE api_keys SET last_used_at = ? WHERE key_id = ?"
                " AND (last_used_at IS NULL OR last_used_at < ?)",
                (at.isoformat(), key_id, at.isoformat()),
            )

        await self._run(work)

    async def update_key_hash(self, key_id: str, old_hash: str, new_hash: str) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE api_keys SET key_hash = ? WHERE key_id = ? AND key_hash = ?",
                (new_hash, key_id, old_hash),
            )

        await self._run(work)

    async def purge(
        self, raw_before: datetime | None, device_ids_before: datetime | None, batch: int = 500
    ) -> Purged:
        done = {PURGED_RAW: 0, PURGED_DEVICE_IDS: 0}
        for bit, before in ((PURGED_RAW, raw_before), (PURGED_DEVICE_IDS, device_ids_before)):
            if before is None:
                continue
            # received_at is ISO-8601 text in UTC: text order is time order.
            cutoff = before.astimezone(UTC).isoformat()

            def work(conn: sqlite3.Connection, bit: int = bit, cutoff: str = cutoff) -> int:
                rows = conn.execute(
                    "SELECT seq, body FROM events WHERE purged <> 3 AND purged & ? = 0"
                    " AND received_at <> '' AND received_at < ? ORDER BY received_at LIMIT ?",
                    (bit, cutoff, batch),
                ).fetchall()
                conn.executemany(
                    "UPDATE events SET body = ?, purged = purged | ? WHERE seq = ?",
                    [
                        (event_encoder.encode(scrubbed(event_decoder.decode(body), bit)), bit, seq)
                        for seq, body in rows
                    ],
                )
                return len(rows)

            while True:
                n = await self._db.transaction(work)
                done[bit] += n
                if n < batch:
                    break
        return Purged(raw=done[PURGED_RAW], device_ids=done[PURGED_DEVICE_IDS])
