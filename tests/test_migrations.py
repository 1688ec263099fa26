"""Schema migrations (gateway/storage/migrations.py), on both backends: a database made by an
earlier version is brought up to date on open, keeping its events and keys; one already up to
date is left alone; one migrated by a newer gateway is refused.

"Version 0" below is the schema exactly as the gateway shipped it before migrations existed
(no ``schema_version`` table, no ``purged`` column); its rows are written with plain SQL, as
that version wrote them.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from gateway.errors import StorageUnavailable
from gateway.events import event_encoder
from gateway.storage import StoreResult, open_storage
from gateway.storage.migrations import LATEST, POSTGRES, SQLITE
from tests.test_storage import T0, event, postgres_database

SQLITE_V0 = """
CREATE TABLE events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT NOT NULL UNIQUE,
    partner     TEXT NOT NULL,
    dedupe_key  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    attributed  INTEGER NOT NULL,
    received_at TEXT NOT NULL,
    body        BLOB NOT NULL,
    UNIQUE (partner, dedupe_key)
);
CREATE INDEX events_by_partner ON events (partner, seq);
CREATE TABLE api_keys (
    key_id       TEXT PRIMARY KEY,
    partner      TEXT NOT NULL,
    key_hash     TEXT NOT NULL UNIQUE,
    hint         TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    revoked_at   TEXT,
    last_used_at TEXT
);
CREATE INDEX api_keys_by_partner ON api_keys (partner);
"""

POSTGRES_V0 = (
    """
    CREATE TABLE events (
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
    "CREATE INDEX events_by_partner ON events (partner, seq)",
    """
    CREATE TABLE api_keys (
        key_id       text PRIMARY KEY,
        partner      text NOT NULL,
        key_hash     text NOT NULL UNIQUE,
        hint         text NOT NULL,
        created_at   timestamptz NOT NULL,
        revoked_at   timestamptz,
        last_used_at timestamptz
    )
    """,
    "CREATE INDEX api_keys_by_partner ON api_keys (partner)",
)

OLD = event("old-key", event_id="evt_old")


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def old_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A version-0 database holding one event and one key."""
    row = (OLD.event_id, OLD.partner, OLD.dedupe_key, OLD.kind, True, T0, event_encoder.encode(OLD))
    key = ("key_old", "kochava", "an-old-hash", "ab12", T0)
    if backend == "sqlite":
        path = tmp_path / "old.db"
        with sqlite3.connect(path) as conn:
            conn.executescript(SQLITE_V0)
            conn.execute(
                "INSERT INTO events (event_id, partner, dedupe_key, kind, attributed,"
                " received_at, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (*row[:4], 1, T0.isoformat(), row[6]),
            )
            conn.execute(
                "INSERT INTO api_keys (key_id, partner, key_hash, hint, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (*key[:4], T0.isoformat()),
            )
        conn.close()
        yield f"sqlite:///{path}"
        return
    with postgres_database() as url, psycopg.connect(url, autocommit=True) as conn:
        for statement in POSTGRES_V0:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO events (event_id, partner, dedupe_key, kind, attributed, received_at,"
            " body) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            row,
        )
        conn.execute(
            "INSERT INTO api_keys (key_id, partner, key_hash, hint, created_at)"
            " VALUES (%s, %s, %s, %s, %s)",
            key,
        )
        yield url


def versions(url: str) -> list[tuple[int, str]]:
    """The schema_version rows: (version, applied_at as text)."""
    sql = "SELECT version, applied_at FROM schema_version ORDER BY version"
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            rows = conn.execute(sql).fetchall()
        conn.close()
    else:
        with psycopg.connect(url) as pg:
            rows = pg.execute(sql).fetchall()
    return [(int(v), str(at)) for v, at in rows]


def columns(url: str) -> set[str]:
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            names = {row[1] for row in conn.execute("PRAGMA table_info(events)")}
        conn.close()
        return names
    with psycopg.connect(url) as pg:
        rows = pg.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'events'"
        ).fetchall()
    return {str(r[0]) for r in rows}


def set_version(url: str, sql: str) -> None:
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            conn.execute(sql)
        conn.close()
    else:
        with psycopg.connect(url, autocommit=True) as pg:
            pg.execute(sql)


def use(url: str) -> tuple[list[str], list[tuple[str, str]], list[StoreResult]]:
    """Open the store as the gateway does; read the old event and key, store a new event."""

    async def main() -> tuple[list[str], list[tuple[str, str]], list[StoreResult]]:
        storage = open_storage(url)
        await storage.open()
        try:
            events = [e.event_id for e in await storage.events()]
            keys = await storage.active_key_hashes("kochava")
            stored = await storage.store([event("new-key", event_id="evt_new")])
            return events, keys, stored
        finally:
            await storage.close()

    return asyncio.run(main())


def test_both_backends_know_the_same_versions() -> None:
    assert [m.version for m in SQLITE] == [m.version for m in POSTGRES]
    assert [m.version for m in SQLITE] == list(range(1, LATEST + 1))


def test_a_version_0_database_is_migrated_on_open_and_keeps_its_data(old_url: str) -> None:
    assert "purged" not in columns(old_url)
    events, keys, stored = use(old_url)
    assert events == ["evt_old"]
    assert keys == [("key_old", "an-old-hash")]
    assert stored == [StoreResult(stored=True, event_id="evt_new")]
    assert [v for v, _ in versions(old_url)] == list(range(1, LATEST + 1))
    assert "purged" in columns(old_url)


def test_an_up_to_date_database_is_left_alone(old_url: str) -> None:
    use(old_url)
    first = versions(old_url)
    use(old_url)
    assert versions(old_url) == first  # nothing applied twice, applied_at unchanged


def test_a_database_at_version_1_gets_only_the_later_migrations(old_url: str) -> None:
    use(old_url)
    set_version(old_url, "DELETE FROM schema_version WHERE version > 1")
    at_one = versions(old_url)
    assert [v for v, _ in at_one] == [1]
    use(old_url)
    now = versions(old_url)
    assert now[0] == at_one[0]  # migration 1 not applied again
    assert [v for v, _ in now] == list(range(1, LATEST + 1))


def test_a_database_migrated_by_a_newer_gateway_is_refused(old_url: str) -> None:
    use(old_url)
    set_version(
        old_url,
        "INSERT INTO schema_version (version, name, applied_at)"
        " VALUES (999, 'from the future', '2030-01-01T00:00:00+00:00')",
    )
    with pytest.raises(StorageUnavailable, match=r"999.*newer"):
        use(old_url)


def test_a_new_database_starts_at_the_latest_version(backend: str, tmp_path: Path) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path}/new.db"
        use(url)
        assert [v for v, _ in versions(url)] == list(range(1, LATEST + 1))
        return
    with postgres_database() as url:
        use(url)
        assert [v for v, _ in versions(url)] == list(range(1, LATEST + 1))
