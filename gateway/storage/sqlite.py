"""SQLite storage: the embedded default. One file, WAL mode, every commit synced to disk.

All database work runs on one dedicated thread per process, so the event loop never blocks on
disk. Several processes may share the file; SQLite's write lock and the unique index on
``(partner, dedupe_key)`` keep concurrent retries to one stored event.

The partners' active key hashes are read on every postback, so each process keeps them in memory
with a *stamp*: eight bytes in ``<database>-keys``, mapped into memory by every process using
the database, which every change to the keys (add, revoke, rehash) sets to new random bytes
once it is committed. A read compares the stamp with the one its copy was made under (a memory
read, no system call) and reads the table again when they differ, so a revoked key is refused
from the next request on, in every process on the host. A copy is also read again after
``KEY_CACHE_MAX_AGE_S`` seconds, in case a process died between its commit and its stamp.
"""

from __future__ import annotations

import mmap
import os
import sqlite3
import time
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

#: An event as stored: event_id, partner, dedupe_key, kind, attributed, received_at, body.
_Row = tuple[str, str, str, str, int, str, bytes]


#: Rows per INSERT statement: 7 parameters each, within SQLite's limit of 32,766.
INSERT_ROWS = 4000

_INSERT = (
    "INSERT INTO events (event_id, partner, dedupe_key, kind, attributed, received_at, body)"
    " VALUES "
)
_ROW = "(?, ?, ?, ?, ?, ?, ?)"


def _store_rows(conn: sqlite3.Connection, calls: list[list[_Row]]) -> list[list[StoreResult]]:
    """Store the rows of several ``store`` calls at once, atomically: one multi-row INSERT in
    autocommit mode (its own transaction), or one transaction for more than INSERT_ROWS rows. A
    row whose (partner, dedupe_key) is stored already, or comes earlier in the same INSERT, is
    skipped. One list of results per call, in order."""
    rows = [row for call in calls for row in call]
    if not rows:
        return [[] for _ in calls]
    if len(rows) <= INSERT_ROWS:
        inserted = _insert(conn, rows)
    else:
        conn.execute("BEGIN IMMEDIATE")
        try:
            inserted = sum(
                _insert(conn, rows[start : start + INSERT_ROWS])
                for start in range(0, len(rows), INSERT_ROWS)
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    if inserted == len(rows):
        return [[StoreResult(stored=True, event_id=row[0]) for row in call] for call in calls]
    # Some were stored already (retries, rare): each row's stored event tells which.
    out: list[list[StoreResult]] = []
    for call in calls:
        results = []
        for row in call:
            (existing,) = conn.execute(
                "SELECT event_id FROM events WHERE partner = ? AND dedupe_key = ?",
                (row[1], row[2]),
            ).fetchone()
            results.append(StoreResult(stored=existing == row[0], event_id=str(existing)))
        out.append(results)
    return out


def _insert(conn: sqlite3.Connection, rows: list[_Row]) -> int:
    sql = _INSERT + ", ".join([_ROW] * len(rows)) + " ON CONFLICT (partner, dedupe_key) DO NOTHING"
    return int(conn.execute(sql, [value for row in rows for value in row]).rowcount)


#: Longest a process uses its copy of a partner's key hashes without reading them again.
KEY_CACHE_MAX_AGE_S = 5.0


class ChangeStamp:
    """Eight bytes in a file, shared through memory by every process that maps it: changed to
    new random bytes by :meth:`change`, compared by :meth:`read` (no system call)."""

    SIZE = 8

    def __init__(self, path: Path) -> None:
        self.path = path
        self._map: mmap.mmap | None = None

    def open(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < self.SIZE:
                os.ftruncate(fd, self.SIZE)
            self._map = mmap.mmap(fd, self.SIZE)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def read(self) -> bytes:
        if self._map is None:
            raise StorageUnavailable(f"{self.path.name} is not open")
        return self._map[: self.SIZE]

    def change(self) -> None:
        if self._map is not None:
            self._map[: self.SIZE] = os.urandom(self.SIZE)


class SQLiteStorage:
    def __init__(self, path: Path) -> None:
        self.path = path
        # The schema comes from the migrations (gateway/storage/migrations.py), run in open().
        self._db = SQLiteThread(path, "", StorageUnavailable, synchronous="FULL")
        self._run = self._db.run
        self._key_stamp = ChangeStamp(path.with_name(path.name + "-keys"))
        #: partner → (stamp, monotonic time read, active key hashes)
        self._key_cache: dict[str, tuple[bytes, float, list[tuple[str, str]]]] = {}

    async def open(self) -> None:
        await self._db.open()
        try:
            await self._db.transaction(lambda conn: migrate_sqlite(conn, str(self.path)))
            self._key_stamp.open()
        except BaseException:
            await self._db.close()
            raise

    async def close(self) -> None:
        self._key_stamp.close()
        self._key_cache.clear()
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
        # Group commit: stores arriving together are written by one INSERT, one transaction and
        # one fsync (gateway/sqlite_thread.py); answered only once it is committed.
        results: list[StoreResult] = await self._db.grouped_batch(rows, _store_rows)
        return results

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

        try:
            await self._run(work)
        finally:
            self._key_stamp.change()

    async def active_key_hashes(self, partner: str) -> list[tuple[str, str]]:
        # The stamp is read before the table: a change committed in between is read now and
        # cached under the old stamp, so the next call reads the table once more. Never stale.
        stamp = self._key_stamp.read()
        now = time.monotonic()
        cached = self._key_cache.get(partner)
        if cached is not None and cached[0] == stamp and now - cached[1] < KEY_CACHE_MAX_AGE_S:
            return list(cached[2])

        def work(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            cur = conn.execute(
                "SELECT key_id, key_hash FROM api_keys WHERE partner = ? AND revoked_at IS NULL",
                (partner,),
            )
            return [(str(a), str(b)) for a, b in cur.fetchall()]

        hashes = await self._run(work)
        self._key_cache[partner] = (stamp, now, hashes)
        return list(hashes)

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

        try:
            return await self._run(work)
        finally:
            self._key_stamp.change()

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

        try:
            await self._run(work)
        finally:
            self._key_stamp.change()

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
