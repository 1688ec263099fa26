"""PostgreSQL storage: for production, and for several gateway processes on several hosts.

Same tables and the same behaviour as the SQLite backend. Connections come from one
``psycopg_pool.AsyncConnectionPool`` per process, opened in :meth:`PostgresStorage.open`. The
schema is created on open, under an advisory lock so processes starting together do not race.

Idempotency rests on the unique index on ``(partner, dedupe_key)``: ``INSERT … ON CONFLICT DO
NOTHING`` waits for a concurrent insert of the same key to commit (or roll back), and at READ
COMMITTED the following ``SELECT`` takes a new snapshot, so it sees that committed row. Every
psycopg error, socket error and pool timeout becomes :class:`~gateway.errors.StorageUnavailable`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from gateway.errors import StorageUnavailable
from gateway.events import AttributionEvent, event_decoder, event_encoder
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
from gateway.storage.migrations import migrate_postgres

#: Key of the transaction-level advisory lock held while the schema is created.
SCHEMA_LOCK = 0x6761_7465_7761_7901  # "gatewa" "y\x01"

INSERT_EVENT = (
    "INSERT INTO events (event_id, partner, dedupe_key, kind, attributed, received_at, body)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (partner, dedupe_key) DO NOTHING"
    " RETURNING event_id"
)
SELECT_EXISTING = "SELECT event_id FROM events WHERE partner = %s AND dedupe_key = %s"
# Many rows in one statement, inserted in the order given (a later row with the dedupe key of an
# earlier one is the duplicate).
INSERT_EVENTS = (
    "INSERT INTO events (event_id, partner, dedupe_key, kind, attributed, received_at, body)"
    " SELECT e, p, d, k, a, r, b FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[],"
    " %s::boolean[], %s::timestamptz[], %s::bytea[]) WITH ORDINALITY AS t(e, p, d, k, a, r, b, n)"
    " ORDER BY n"
    " ON CONFLICT (partner, dedupe_key) DO NOTHING"
    " RETURNING event_id"
)
SELECT_EXISTING_MANY = (
    "SELECT partner, dedupe_key, event_id FROM events"
    " WHERE (partner, dedupe_key) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"
)

#: An event as the columns of its row.
_Row = tuple[str, str, str, str, bool, datetime | None, bytes]

# Transaction-level advisory locks, taken in the order of the (sorted) array.
LOCK_KEYS = "SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) AS k"

Connection = AsyncConnection[TupleRow]


def _lock_id(partner: str, dedupe_key: str) -> int:
    """A stable 64-bit advisory lock id for one dedupe key (a collision only serialises more)."""
    text = f"{partner}\x00{dedupe_key}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big", signed=True)


def _utc(value: datetime | None) -> datetime | None:
    return value.astimezone(UTC) if value is not None else None


#: When each pooled connection was last handed back to the pool.
_returned_at: weakref.WeakKeyDictionary[Connection, float] = weakref.WeakKeyDictionary()

#: A connection idle in the pool longer than this is checked (a round trip) before it is lent:
#: the server may have closed it meanwhile. One in use moments ago is lent as it is: a round
#: trip per checkout was a quarter of the gateway's time under load, and a connection that did
#: break fails its query (503, the partner retries) and is dropped by the pool on return.
CHECK_IDLE_AFTER_S = 1.0


async def _note_returned(conn: Connection) -> None:
    _returned_at[conn] = time.monotonic()


async def _check_if_idle(conn: Connection) -> None:
    returned = _returned_at.get(conn)
    if returned is None or time.monotonic() - returned > CHECK_IDLE_AFTER_S:
        await AsyncConnectionPool.check_connection(conn)


async def _configure(conn: Connection) -> None:
    # Read timestamptz back in UTC; a naive datetime written is taken as UTC.
    await conn.execute("SET TIME ZONE 'UTC'")


#: Longest a request waits for a pooled connection. A healthy pool hands one over in well under
#: a millisecond (stores share one per turn of the event loop), so a longer wait means PostgreSQL
#: cannot be reached: answer 503 (the partner retries) before the least patient partner gives
#: up (Branch, after 2 s), rather than hold the request.
ACQUIRE_TIMEOUT_S = 1.5

#: How long the pool keeps retrying a connection it lost before giving that attempt up. The
#: pool's retries back off (1 s, 2 s, 4 s, … up to this bound), so after an outage of a few
#: seconds the next try could come long after PostgreSQL is back, and every request meanwhile
#: would wait ACQUIRE_TIMEOUT_S for nothing and answer 503. Bounded at 1 s, an attempt tries at
#: most twice, a second apart; once it has given up, the next request that finds no connection
#: makes the pool try again at once. So a request that arrives once PostgreSQL is back gets a
#: connection within its wait, however long the outage lasted.
RECONNECT_TIMEOUT_S = 1.0


class PostgresStorage:
    """Storage in PostgreSQL at ``url`` (``postgresql://user@host:port/dbname?…``)."""

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 10.0,
        acquire_timeout: float = ACQUIRE_TIMEOUT_S,
    ) -> None:
        self.url = url
        self.min_size = min_size
        self.max_size = max_size
        self.connect_timeout = connect_timeout
        self.acquire_timeout = acquire_timeout
        self._pool: AsyncConnectionPool[Connection] | None = None
        self._where = _describe(url)
        self._group: list[tuple[list[_Row], asyncio.Future[Any]]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._key_reads: dict[str, asyncio.Future[list[tuple[str, str]]]] = {}

    # -- life cycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the schema and open the pool; StorageUnavailable if the server cannot be used."""
        if self._pool is not None:
            return
        try:
            kwargs = self._connect_kwargs()
            # One plain connection first: it fails fast, with the server's own reason (refused,
            # no such database, authentication), where the pool would retry until its timeout.
            conn = await AsyncConnection.connect(self.url, **kwargs)
            async with conn:
                await _configure(conn)
                await self._create_schema(conn)
            pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
                self.url,
                kwargs=kwargs,
                min_size=self.min_size,
                max_size=self.max_size,
                open=False,
                configure=_configure,
                check=_check_if_idle,
                reset=_note_returned,
                timeout=self.acquire_timeout,
                reconnect_timeout=RECONNECT_TIMEOUT_S,
                name="gateway-storage",
            )
            try:
                await pool.open(wait=True, timeout=self.connect_timeout)
            except BaseException:
                await pool.close()
                raise
        except (psycopg.Error, OSError) as exc:
            raise StorageUnavailable(
                f"cannot use PostgreSQL at {self._where}: {_oneline(exc)}"
            ) from exc
        self._pool = pool

    async def close(self) -> None:
        if self._group:  # stores made just before: written before the pool goes
            self._send_group()
        if self._tasks:  # group writes and key reads under way: let them answer their callers
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await pool.close()
        except (psycopg.Error, OSError) as exc:
            raise StorageUnavailable(f"PostgreSQL at {self._where}: {_oneline(exc)}") from exc

    async def ping(self) -> None:
        async with self._connection() as conn:
            await conn.execute("SELECT 1")

    def _connect_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in conninfo_to_dict(self.url):
            kwargs["connect_timeout"] = max(1, round(self.connect_timeout))
        return kwargs

    async def _create_schema(self, conn: Connection) -> None:
        """Apply the migrations (gateway/storage/migrations.py) under the schema lock."""
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            await migrate_postgres(conn, f"PostgreSQL at {self._where}")

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        """A pooled connection (autocommit); psycopg and socket errors become StorageUnavailable."""
        pool = self._pool
        if pool is None:
            raise StorageUnavailable(f"PostgreSQL storage at {self._where} is not open")
        try:
            async with pool.connection() as conn:
                yield conn
        except (psycopg.Error, OSError) as exc:
            raise StorageUnavailable(f"PostgreSQL at {self._where}: {_oneline(exc)}") from exc

    # -- events --------------------------------------------------------------------------------

    async def store(self, events: Sequence[AttributionEvent]) -> list[StoreResult]:
        """Group commit: the stores called in one turn of the event loop go to the server
        together, in one transaction and one multi-row INSERT on one connection (round trips,
        not fsyncs, are what a store costs here). Each call is answered once that transaction is
        committed. If the group's transaction fails, each of its calls is tried again on its
        own, so a call that cannot be stored fails alone."""
        rows: list[_Row] = [
            (
                e.event_id,
                e.partner,
                e.dedupe_key,
                e.kind,
                e.attributed,
                e.received_at,
                event_encoder.encode(e),
            )
            for e in events
        ]
        if not rows:
            return []
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[StoreResult]] = loop.create_future()
        if self._group is None:
            self._group = []
            loop.call_soon(self._send_group)
        self._group.append((rows, future))
        return await future

    def _send_group(self) -> None:
        group, self._group = self._group or [], None
        if not group:  # sent already, by close()
            return
        task = asyncio.get_running_loop().create_task(self._write_group(group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write_group(self, group: list[tuple[list[_Row], asyncio.Future[Any]]]) -> None:
        try:
            results = await self._insert([row for rows, _ in group for row in rows])
        except Exception as exc:
            if len(group) > 1 and isinstance(exc, StorageUnavailable):
                await asyncio.gather(*(self._write_group([call]) for call in group))
                return
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:  # cancelled: so are the calls waiting for it
            for _, future in group:
                future.cancel()
            raise
        start = 0
        for rows, future in group:
            if not future.done():  # a caller that gave up (cancelled) is not answered
                future.set_result(results[start : start + len(rows)])
            start += len(rows)

    async def _insert(self, rows: list[_Row]) -> list[StoreResult]:
        """Store ``rows`` in one transaction; one StoreResult per row, in order."""
        keys = {(row[1], row[2]) for row in rows}
        async with self._connection() as conn:
            if len(rows) == 1:  # one statement: atomic as it is, no transaction to open
                return [await self._insert_one(conn, rows[0])]
            async with conn.transaction():
                if len(keys) > 1:
                    # Lock the dedupe keys in one global order before inserting any, so two
                    # groups sharing keys in different orders queue instead of deadlocking.
                    await conn.execute(LOCK_KEYS, (sorted({_lock_id(p, k) for p, k in keys}),))
                cur = await conn.execute(
                    INSERT_EVENTS, [list(column) for column in zip(*rows, strict=True)]
                )
                inserted = {row[0] for row in await cur.fetchall()}
                missing = [row for row in rows if row[0] not in inserted]
                existing: dict[tuple[str, str], str] = {}
                if missing:
                    # Ours (earlier in this group) or committed by now: the INSERT waited for
                    # the other transaction, and this statement takes a new snapshot.
                    cur = await conn.execute(
                        SELECT_EXISTING_MANY, ([r[1] for r in missing], [r[2] for r in missing])
                    )
                    existing = {(p, k): event_id for p, k, event_id in await cur.fetchall()}
                results = []
                for row in rows:
                    if row[0] in inserted:
                        results.append(StoreResult(stored=True, event_id=row[0]))
                        continue
                    found = existing.get((row[1], row[2]))
                    if found is None:  # pragma: no cover - rows are never deleted
                        raise StorageUnavailable(f"dedupe key {row[2]!r} conflicted but is gone")
                    results.append(StoreResult(stored=False, event_id=found))
                return results

    @staticmethod
    async def _insert_one(conn: Connection, row: _Row) -> StoreResult:
        cur = await conn.execute(INSERT_EVENT, row)
        inserted = await cur.fetchone()
        if inserted is not None:
            return StoreResult(stored=True, event_id=inserted[0])
        # The conflicting row is committed by now: the INSERT waited for its transaction, and
        # this statement takes a new snapshot.
        cur = await conn.execute(SELECT_EXISTING, (row[1], row[2]))
        existing = await cur.fetchone()
        if existing is None:  # pragma: no cover - rows are never deleted
            raise StorageUnavailable(f"dedupe key {row[2]!r} conflicted but is not there")
        return StoreResult(stored=False, event_id=existing[0])

    async def events(self, partner: str | None = None, limit: int = 50) -> list[AttributionEvent]:
        # A negative limit means no limit, as in SQLite (LIMIT NULL is LIMIT ALL).
        sql_limit = limit if limit >= 0 else None
        async with self._connection() as conn:
            if partner is None:
                cur = await conn.execute(
                    "SELECT body FROM events ORDER BY seq DESC LIMIT %s", (sql_limit,)
                )
            else:
                cur = await conn.execute(
                    "SELECT body FROM events WHERE partner = %s ORDER BY seq DESC LIMIT %s",
                    (partner, sql_limit),
                )
            bodies = [row[0] for row in await cur.fetchall()]
        return [event_decoder.decode(body) for body in bodies]

    async def count(self, partner: str | None = None) -> int:
        async with self._connection() as conn:
            if partner is None:
                cur = await conn.execute("SELECT count(*) FROM events")
            else:
                cur = await conn.execute(
                    "SELECT count(*) FROM events WHERE partner = %s", (partner,)
                )
            row = await cur.fetchone()
        return int(row[0]) if row is not None else 0

    async def replace(self, events: Sequence[AttributionEvent]) -> list[ReplaceResult]:
        results: list[ReplaceResult] = []
        async with self._connection() as conn, conn.transaction():
            keys = {(e.partner, e.dedupe_key) for e in events}
            if len(keys) > 1:  # one global lock order, as in store()
                await conn.execute(LOCK_KEYS, (sorted({_lock_id(p, k) for p, k in keys}),))
            for e in events:
                row = (e.event_id, e.partner, e.dedupe_key, e.kind, e.attributed, e.received_at)
                cur = await conn.execute(INSERT_EVENT, (*row, event_encoder.encode(e)))
                if await cur.fetchone() is not None:
                    results.append(ReplaceResult(outcome="stored", event_id=e.event_id))
                    continue
                cur = await conn.execute(
                    "SELECT event_id, body FROM events WHERE partner = %s AND dedupe_key = %s"
                    " FOR UPDATE",
                    (e.partner, e.dedupe_key),
                )
                found = await cur.fetchone()
                if found is None:  # pragma: no cover - rows are never deleted
                    raise StorageUnavailable(f"dedupe key {e.dedupe_key!r} conflicted but is gone")
                new = replacement(e, event_decoder.decode(found[1]))
                if new is None:
                    results.append(ReplaceResult(outcome="unchanged", event_id=found[0]))
                    continue
                await conn.execute(  # a re-map brings the raw payload back: due for retention
                    "UPDATE events SET kind = %s, attributed = %s, body = %s, purged = 0"
                    " WHERE event_id = %s",
                    (new.kind, new.attributed, event_encoder.encode(new), found[0]),
                )
                results.append(ReplaceResult(outcome="updated", event_id=found[0]))
        return results

    async def find(self, partner: str, dedupe_keys: Sequence[str]) -> dict[str, AttributionEvent]:
        async with self._connection() as conn:
            cur = await conn.execute(
                "SELECT body FROM events WHERE partner = %s AND dedupe_key = ANY(%s)",
                (partner, list(dedupe_keys)),
            )
            bodies = [row[0] for row in await cur.fetchall()]
        found = [event_decoder.decode(body) for body in bodies]
        return {e.dedupe_key: e for e in found}

    async def scan(
        self, partner: str | None = None, after: str | None = None, limit: int = 500
    ) -> list[AttributionEvent]:
        # An unknown ``after`` compares with NULL: no rows, never a restart from the first.
        sql = "SELECT body FROM events WHERE seq > "
        sql += "0" if after is None else "(SELECT seq FROM events WHERE event_id = %s)"
        args: list[str | int] = [] if after is None else [after]
        if partner is not None:
            sql += " AND partner = %s"
            args.append(partner)
        async with self._connection() as conn:
            cur = await conn.execute(sql + " ORDER BY seq LIMIT %s", (*args, limit))
            bodies = [row[0] for row in await cur.fetchall()]
        return [event_decoder.decode(body) for body in bodies]

    # -- API keys ------------------------------------------------------------------------------

    async def add_key(self, record: KeyRecord, key_hash: str) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO api_keys (key_id, partner, key_hash, hint, created_at)"
                " VALUES (%s, %s, %s, %s, %s)",
                (record.key_id, record.partner, key_hash, record.hint, record.created_at),
            )

    async def active_key_hashes(self, partner: str) -> list[tuple[str, str]]:
        """Callers in one turn of the event loop share one query per partner. It is sent after
        all of them arrived, so each sees every revocation committed before it asked."""
        future = self._key_reads.get(partner)
        if future is None:
            loop = asyncio.get_running_loop()
            future = self._key_reads[partner] = loop.create_future()
            loop.call_soon(self._read_keys, partner, future)
        # shield: one caller giving up must not cancel the others' answer
        return await asyncio.shield(future)

    def _read_keys(self, partner: str, future: asyncio.Future[list[tuple[str, str]]]) -> None:
        del self._key_reads[partner]  # from now on, callers wait for a later query

        async def read() -> None:
            try:
                async with self._connection() as conn:
                    cur = await conn.execute(
                        "SELECT key_id, key_hash FROM api_keys"
                        " WHERE partner = %s AND revoked_at IS NULL",
                        (partner,),
                    )
                    rows = await cur.fetchall()
            except Exception as exc:
                future.set_exception(exc)
                future.exception()  # retrieved: nobody may be waiting any more
            else:
                future.set_result([(str(a), str(b)) for a, b in rows])

        task = asyncio.get_running_loop().create_task(read())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def keys(self, partner: str | None = None) -> list[KeyRecord]:
        sql = "SELECT key_id, partner, hint, created_at, revoked_at, last_used_at FROM api_keys"
        args: tuple[str, ...] = ()
        if partner is not None:
            sql += " WHERE partner = %s"
            args = (partner,)
        async with self._connection() as conn:
            cur = await conn.execute(sql + " ORDER BY created_at, key_id", args)
            rows = await cur.fetchall()
        return [
            KeyRecord(
                key_id=r[0],
                partner=r[1],
                hint=r[2],
                created_at=r[3].astimezone(UTC),
                revoked_at=_utc(r[4]),
                last_used_at=_utc(r[5]),
            )
            for r in rows
        ]

    async def revoke_key(self, key_id: str, at: datetime) -> bool:
        async with self._connection() as conn:
            cur = await conn.execute(
                "UPDATE api_keys SET revoked_at = %s WHERE key_id = %s AND revoked_at IS NULL",
                (at, key_id),
            )
            return cur.rowcount == 1

    async def touch_key(self, key_id: str, at: datetime) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE api_keys SET last_used_at = %s WHERE key_id = %s"
                " AND (last_used_at IS NULL OR last_used_at < %s)",
                (at, key_id, at),
            )

    async def update_key_hash(self, key_id: str, old_hash: str, new_hash: str) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE api_keys SET key_hash = %s WHERE key_id = %s AND key_hash = %s",
                (new_hash, key_id, old_hash),
            )

    # -- retention -----------------------------------------------------------------------------

    async def purge(
        self, raw_before: datetime | None, device_ids_before: datetime | None, batch: int = 500
    ) -> Purged:
        done = {PURGED_RAW: 0, PURGED_DEVICE_IDS: 0}
        for bit, before in ((PURGED_RAW, raw_before), (PURGED_DEVICE_IDS, device_ids_before)):
            if before is None:
                continue
            while True:
                async with self._connection() as conn, conn.transaction():
                    # SKIP LOCKED: processes purging at once take different rows, never wait.
                    cur = await conn.execute(
                        "SELECT seq, body FROM events WHERE purged <> 3 AND purged & %s = 0"
                        " AND received_at < %s ORDER BY received_at LIMIT %s"
                        " FOR UPDATE SKIP LOCKED",
                        (bit, before, batch),
                    )
                    rows = await cur.fetchall()
                    async with conn.cursor() as update:
                        await update.executemany(
                            "UPDATE events SET body = %s, purged = purged | %s WHERE seq = %s",
                            [
                                (
                                    event_encoder.encode(scrubbed(event_decoder.decode(b), bit)),
                                    bit,
                                    seq,
                                )
                                for seq, b in rows
                            ],
                        )
                done[bit] += len(rows)
                if len(rows) < batch:
                    break
        return Purged(raw=done[PURGED_RAW], device_ids=done[PURGED_DEVICE_IDS])


def _oneline(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _describe(url: str) -> str:
    """host:port/dbname of a connection URL, for messages (never the password)."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        return "<invalid URL>"
    host = params.get("host") or "localhost"
    port = params.get("port") or "5432"
    dbname = params.get("dbname") or params.get("user") or ""
    return f"{host}:{port}/{dbname}"
