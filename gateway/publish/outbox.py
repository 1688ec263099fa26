"""The outbox in storage: which stored events still have to be published, and who publishes.

Installed on first use (:meth:`Outbox.open`, idempotent, safe for processes starting together):

- ``event_outbox (seq)``: the ``seq`` of each stored, unpublished event. A trigger on ``events``
  adds it in the transaction that stores the event (rows skipped by ``ON CONFLICT DO NOTHING``
  and re-maps by ``UPDATE`` do not fire it), so an event answered 202 is in the outbox. The
  publisher deletes the row once the engine has the event. Events stored before the outbox was
  installed are not in it (``gateway export`` has them).
- ``outbox_lease (name, holder, expires_at)``: one row naming the process that publishes now.
  A holder renews it; anyone takes it once it has expired; a holder that stops deletes it.

This is not one of storage's numbered migrations (gateway/storage/migrations.py) on purpose: it
is installed only where publishing is on, so a gateway that never publishes pays nothing for it
(no trigger on its inserts, no table growing). Installing is idempotent and runs on every start
after storage's migrations, so a migration that rebuilds ``events`` (and loses its triggers) gets
the trigger back on the same start; it should re-create it itself if old processes still write.

Each outbox uses a connection of its own, apart from the storage backend's, so publishing never
queues behind (or in front of) the postbacks' own storage work.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from gateway.errors import StorageUnavailable
from gateway.publish import OutboxEntry
from gateway.sqlite_thread import SQLiteThread
from gateway.storage.postgres import RECONNECT_TIMEOUT_S

#: The oldest unpublished events, with what an engine needs of each.
_PENDING = (
    "SELECT o.seq, e.event_id, e.partner, e.kind, e.received_at, e.body"
    " FROM event_outbox o JOIN events e ON e.seq = o.seq ORDER BY o.seq LIMIT {limit}"
)


class Outbox(Protocol):
    async def open(self) -> None:
        """Install the outbox (table, trigger, lease) if need be; StorageUnavailable if not."""

    async def close(self) -> None: ...

    async def pending(self, limit: int) -> list[OutboxEntry]:
        """Up to ``limit`` unpublished events, oldest first."""

    async def done(self, seqs: Sequence[int]) -> None:
        """Forget these events: they are published."""

    async def count(self) -> int:
        """How many events wait to be published."""

    async def take_lease(self, name: str, holder: str, seconds: float) -> bool:
        """Take or renew lease ``name`` for ``seconds``: True if ``holder`` has it now."""

    async def drop_lease(self, name: str, holder: str) -> None:
        """Let the lease go, if ``holder`` has it."""

    async def lease_holder(self, name: str) -> str | None:
        """Who holds the lease now (None: nobody, or it has expired)."""


def open_outbox(url: str) -> Outbox:
    """The outbox in the storage at ``url`` (not yet opened)."""
    if url.startswith("sqlite:///"):
        return SQLiteOutbox(Path(url.removeprefix("sqlite:///")))
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresOutbox(url)
    raise ValueError(f"unsupported storage URL scheme: {url.split(':')[0]!r}")


# -- SQLite -------------------------------------------------------------------------------------

SQLITE_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS event_outbox (seq INTEGER PRIMARY KEY);
CREATE TRIGGER IF NOT EXISTS event_outbox_add AFTER INSERT ON events
BEGIN
    INSERT INTO event_outbox (seq) VALUES (NEW.seq);
END;
CREATE TABLE IF NOT EXISTS outbox_lease (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at REAL NOT NULL
);
COMMIT;
"""


class SQLiteOutbox:
    """Processes on one host share the file; lease times are that host's clock."""

    def __init__(self, path: Path) -> None:
        # The events' own transactions are synced to disk (FULL); forgetting published events
        # need not be: lost on a power cut, they are only published again.
        self._db = SQLiteThread(path, SQLITE_SCHEMA, StorageUnavailable, synchronous="NORMAL")

    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    async def pending(self, limit: int) -> list[OutboxEntry]:
        def work(conn: sqlite3.Connection) -> list[OutboxEntry]:
            rows = conn.execute(_PENDING.format(limit="?"), (limit,)).fetchall()
            return [
                OutboxEntry(
                    seq=r[0],
                    event_id=r[1],
                    partner=r[2],
                    kind=r[3],
                    received_at=_sqlite_time(r[4]),
                    body=bytes(r[5]),
                )
                for r in rows
            ]

        return await self._db.run(work)

    async def done(self, seqs: Sequence[int]) -> None:
        def work(conn: sqlite3.Connection) -> None:
            for start in range(0, len(seqs), 500):  # SQLite caps the number of parameters
                chunk = list(seqs[start : start + 500])
                marks = ", ".join("?" * len(chunk))
                conn.execute(f"DELETE FROM event_outbox WHERE seq IN ({marks})", chunk)  # noqa: S608

        await self._db.transaction(work)

    async def count(self) -> int:
        def work(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT count(*) FROM event_outbox").fetchone()[0])

        return await self._db.run(work)

    async def take_lease(self, name: str, holder: str, seconds: float) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            now = time.time()
            cur = conn.execute(
                "INSERT INTO outbox_lease (name, holder, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,"
                " expires_at = excluded.expires_at"
                " WHERE outbox_lease.holder = excluded.holder OR outbox_lease.expires_at < ?",
                (name, holder, now + seconds, now),
            )
            return cur.rowcount == 1

        return await self._db.run(work)

    async def drop_lease(self, name: str, holder: str) -> None:
        await self._db.run(
            lambda conn: conn.execute(
                "DELETE FROM outbox_lease WHERE name = ? AND holder = ?", (name, holder)
            )
        )

    async def lease_holder(self, name: str) -> str | None:
        def work(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT holder FROM outbox_lease WHERE name = ? AND expires_at >= ?",
                (name, time.time()),
            ).fetchone()
            return str(row[0]) if row else None

        return await self._db.run(work)


def _sqlite_time(value: object) -> datetime | None:
    """A stored received_at (ISO-8601 text), None when empty or not readable."""
    try:
        return datetime.fromisoformat(str(value)) if value else None
    except ValueError:
        return None


# -- PostgreSQL ---------------------------------------------------------------------------------

#: Key of the transaction-level advisory lock held while the outbox is installed.
OUTBOX_LOCK = 0x6761_7465_7761_7902  # "gatewa" "y\x02"

POSTGRES_SCHEMA: tuple[str, ...] = (
    "CREATE TABLE IF NOT EXISTS event_outbox (seq bigint PRIMARY KEY)",
    """
    CREATE TABLE IF NOT EXISTS outbox_lease (
        name       text PRIMARY KEY,
        holder     text NOT NULL,
        expires_at timestamptz NOT NULL
    )
    """,
    # One statement-level trigger: a multi-row INSERT adds its rows to the outbox in one go.
    # Checked first: CREATE OR REPLACE would lock the events table on every start.
    """
    DO $$ BEGIN
        IF NOT EXISTS (
            SELECT 1 FROM pg_trigger
            WHERE tgname = 'event_outbox_add' AND tgrelid = 'events'::regclass
        ) THEN
            CREATE OR REPLACE FUNCTION gateway_event_outbox_add() RETURNS trigger
            LANGUAGE plpgsql AS $f$
            BEGIN
                INSERT INTO event_outbox (seq) SELECT seq FROM inserted_events;
                RETURN NULL;
            END $f$;
            CREATE TRIGGER event_outbox_add AFTER INSERT ON events
                REFERENCING NEW TABLE AS inserted_events
                FOR EACH STATEMENT EXECUTE FUNCTION gateway_event_outbox_add();
        END IF;
    END $$
    """,
)

Connection = psycopg.AsyncConnection[TupleRow]


async def _configure(conn: Connection) -> None:
    await conn.execute("SET TIME ZONE 'UTC'")


class PostgresOutbox:
    """Hosts share the database; lease times are the database server's clock."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url
        self.timeout = timeout
        self._pool: AsyncConnectionPool[Connection] | None = None

    async def open(self) -> None:
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(1, round(self.timeout)),
        }
        try:
            # A plain connection first: it fails at once, with the server's reason, where the
            # pool would retry until its timeout.
            conn = await psycopg.AsyncConnection.connect(self.url, **kwargs)
            async with conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (OUTBOX_LOCK,))
                for statement in POSTGRES_SCHEMA:
                    await conn.execute(statement)
            pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
                self.url,
                kwargs=kwargs,
                min_size=1,
                max_size=2,
                open=False,
                configure=_configure,
                check=AsyncConnectionPool.check_connection,
                timeout=self.timeout,
                reconnect_timeout=RECONNECT_TIMEOUT_S,  # publishing resumes once it is back
                name="gateway-outbox",
            )
            try:
                await pool.open(wait=True, timeout=self.timeout)
            except BaseException:
                await pool.close()
                raise
        except (psycopg.Error, OSError) as exc:
            raise StorageUnavailable(f"outbox: {_oneline(exc)}") from exc
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def _fetch(self, sql: str, args: tuple[object, ...]) -> list[TupleRow]:
        if self._pool is None:
            raise StorageUnavailable("outbox is not open")
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(sql, args)
                return await cur.fetchall() if cur.description is not None else []
        except (psycopg.Error, OSError) as exc:
            raise StorageUnavailable(f"outbox: {_oneline(exc)}") from exc

    async def pending(self, limit: int) -> list[OutboxEntry]:
        rows = await self._fetch(_PENDING.format(limit="%s"), (limit,))
        return [
            OutboxEntry(
                seq=r[0],
                event_id=r[1],
                partner=r[2],
                kind=r[3],
                received_at=r[4].astimezone(UTC) if r[4] is not None else None,
                body=bytes(r[5]),
            )
            for r in rows
        ]

    async def done(self, seqs: Sequence[int]) -> None:
        await self._fetch("DELETE FROM event_outbox WHERE seq = ANY(%s)", (list(seqs),))

    async def count(self) -> int:
        rows = await self._fetch("SELECT count(*) FROM event_outbox", ())
        return int(rows[0][0])

    async def take_lease(self, name: str, holder: str, seconds: float) -> bool:
        rows = await self._fetch(
            "INSERT INTO outbox_lease (name, holder, expires_at)"
            " VALUES (%s, %s, clock_timestamp() + %s * interval '1 second')"
            " ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder,"
            " expires_at = EXCLUDED.expires_at"
            " WHERE outbox_lease.holder = EXCLUDED.holder"
            " OR outbox_lease.expires_at < clock_timestamp()"
            " RETURNING holder",
            (name, holder, seconds),
        )
        return bool(rows)

    async def drop_lease(self, name: str, holder: str) -> None:
        await self._fetch(
            "DELETE FROM outbox_lease WHERE name = %s AND holder = %s", (name, holder)
        )

    async def lease_holder(self, name: str) -> str | None:
        rows = await self._fetch(
            "SELECT holder FROM outbox_lease WHERE name = %s AND expires_at >= clock_timestamp()",
            (name,),
        )
        return str(rows[0][0]) if rows else None


def _oneline(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
