"""Schema migrations of the storage backends: numbered, explicit, applied on open.

Each backend keeps a ``schema_version`` table with one row per migration applied (its number,
name and time). Opening a store applies, in order and in one transaction, every migration whose
number is above the highest row, and records each; a store already at the latest version is left
alone. Processes opening one store together queue for the write lock (SQLite: ``BEGIN
IMMEDIATE``; PostgreSQL: an advisory lock), so each migration runs once.

A database made before this table existed (version 0) holds migration 1's tables already:
migration 1 creates them only if they are missing, so it is recorded and nothing changes. A
database whose version is above every migration this gateway knows was migrated by a newer
gateway: it is refused, naming both versions, rather than used with a schema this code does not
know.

To change the schema, append a migration with the next number to both lists (never edit one that
has shipped) and add a case to tests/test_migrations.py.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from typing import NamedTuple

from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from gateway.errors import StorageUnavailable

VERSION_TABLE = "schema_version"


class Migration(NamedTuple):
    version: int
    name: str
    #: SQL statements, or (SQLite) functions of the connection, run in order.
    steps: tuple[str | Callable[[sqlite3.Connection], None], ...]


def _sqlite_add_purged(conn: sqlite3.Connection) -> None:
    # SQLite has no ADD COLUMN IF NOT EXISTS; files made by a development build may have it.
    columns = {row[1] for row in conn.execute("PRAGMA table_info(events)")}
    if "purged" not in columns:
        conn.execute("ALTER TABLE events ADD COLUMN purged INTEGER NOT NULL DEFAULT 0")


SQLITE: tuple[Migration, ...] = (
    Migration(
        1,
        "events and api_keys",
        (
            """
            CREATE TABLE IF NOT EXISTS events (
                seq         INTEGER PRIMARY KEY AUTOINCREMENT,
                event_id    TEXT NOT NULL UNIQUE,
                partner     TEXT NOT NULL,
                dedupe_key  TEXT NOT NULL,
                kind        TEXT NOT NULL,
                attributed  INTEGER NOT NULL,
                received_at TEXT NOT NULL,
                body        BLOB NOT NULL,
                UNIQUE (partner, dedupe_key)
            )
            """,
            "CREATE INDEX IF NOT EXISTS events_by_partner ON events (partner, seq)",
            """
            CREATE TABLE IF NOT EXISTS api_keys (
                key_id       TEXT PRIMARY KEY,
                partner      TEXT NOT NULL,
                key_hash     TEXT NOT NULL UNIQUE,
                hint         TEXT NOT NULL,
                created_at   TEXT NOT NULL,
                revoked_at   TEXT,
                last_used_at TEXT
            )
            """,
            "CREATE INDEX IF NOT EXISTS api_keys_by_partner ON api_keys (partner)",
        ),
    ),
    Migration(
        2,
        "retention: events.purged (gateway/retention.py)",
        (
            _sqlite_add_purged,
            "CREATE INDEX IF NOT EXISTS events_to_purge ON events (received_at) WHERE purged <> 3",
        ),
    ),
)

POSTGRES: tuple[Migration, ...] = (
    Migration(
        1,
        "events and api_keys",
        (
            """
            CREATE TABLE IF NOT EXISTS events (
                seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                event_id    text NOT NULL UNIQUE,
                partner     text NOT NULL,
                dedupe_key  text NOT NULL,
                kind        text NOT NULL,
                attributed  boolean NOT NULL,
                received_at timestamptz,
                body        bytea NOT NULL,
                UNIQUE (partner, dedupe_key)
            )
            """,
            "CREATE INDEX IF NOT EXISTS events_by_partner ON events (partner, seq)",
            """
            CREATE TABLE IF NOT EXISTS api_keys (
                key_id       text PRIMARY KEY,
                partner      text NOT NULL,
                key_hash     text NOT NULL UNIQUE,
                hint         text NOT NULL,
                created_at   timestamptz NOT NULL,
                revoked_at   timestamptz,
                last_used_at timestamptz
            )
            """,
            "CREATE INDEX IF NOT EXISTS api_keys_by_partner ON api_keys (partner)",
        ),
    ),
    Migration(
        2,
        "retention: events.purged (gateway/retention.py)",
        (
            "ALTER TABLE events ADD COLUMN IF NOT EXISTS purged smallint NOT NULL DEFAULT 0",
            "CREATE INDEX IF NOT EXISTS events_to_purge ON events (received_at) WHERE purged <> 3",
        ),
    ),
)

LATEST = SQLITE[-1].version
assert LATEST == POSTGRES[-1].version, "both backends migrate to the same version"

_CREATE_SQLITE = (
    f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (version INTEGER PRIMARY KEY,"
    " name TEXT NOT NULL, applied_at TEXT NOT NULL)"
)
_CREATE_POSTGRES = (
    f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (version integer PRIMARY KEY,"
    " name text NOT NULL, applied_at timestamptz NOT NULL)"
)


def _pending(current: int, migrations: tuple[Migration, ...], where: str) -> list[Migration]:
    latest = migrations[-1].version
    if current > latest:
        raise StorageUnavailable(
            f"{where} has schema version {current}, newer than this gateway knows ({latest}):"
            " it was migrated by a newer gateway; run that version"
        )
    return [m for m in migrations if m.version > current]


def migrate_sqlite(conn: sqlite3.Connection, where: str = "SQLite storage") -> list[int]:
    """Bring the schema up to date; call inside ``BEGIN IMMEDIATE`` (one transaction: SQLite's
    DDL is transactional). Returns the versions applied."""
    conn.execute(_CREATE_SQLITE)
    current = conn.execute(f"SELECT coalesce(max(version), 0) FROM {VERSION_TABLE}").fetchone()[0]  # noqa: S608
    applied = []
    for migration in _pending(int(current), SQLITE, where):
        for step in migration.steps:
            if isinstance(step, str):
                conn.execute(step)
            else:
                step(conn)
        conn.execute(
            f"INSERT INTO {VERSION_TABLE} (version, name, applied_at) VALUES (?, ?, ?)",  # noqa: S608
            (migration.version, migration.name, datetime.now(UTC).isoformat()),
        )
        applied.append(migration.version)
    return applied


async def migrate_postgres(
    conn: AsyncConnection[TupleRow], where: str = "PostgreSQL storage"
) -> list[int]:
    """Bring the schema up to date; call inside a transaction holding the schema lock (an
    ``AsyncConnection``: PostgreSQL's DDL is transactional). Returns the versions applied."""
    await conn.execute(_CREATE_POSTGRES)
    cur = await conn.execute(f"SELECT coalesce(max(version), 0) FROM {VERSION_TABLE}")  # noqa: S608
    row = await cur.fetchone()
    applied = []
    for migration in _pending(int(row[0]) if row else 0, POSTGRES, where):
        for step in migration.steps:
            if not isinstance(step, str):  # pragma: no cover - only SQLite has function steps
                raise TypeError(f"migration {migration.version}: PostgreSQL steps are SQL")
            await conn.execute(step)
        await conn.execute(
            f"INSERT INTO {VERSION_TABLE} (version, name, applied_at) VALUES (%s, %s, now())",  # noqa: S608
            (migration.version, migration.name),
        )
        applied.append(migration.version)
    return applied
