"""The storage contract: every test runs against SQLite (a file in a temporary folder) and
PostgreSQL (a fresh database on the server at GATEWAY_TEST_POSTGRES_URL, dropped afterwards).

No PostgreSQL server is a failure, not a skip. Tests are plain functions that drive the storage
with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
import threading
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import psycopg
import pytest
from psycopg import sql

from gateway.errors import StorageUnavailable
from gateway.events import AttributionEvent
from gateway.storage import KeyRecord, ReplaceResult, Storage, StoreResult, open_storage

T = TypeVar("T")

POSTGRES_ADMIN_URL = os.environ.get(
    "GATEWAY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
BACKENDS = ["sqlite", "postgres"]
T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


# -- fixtures and helpers ------------------------------------------------------------------------


def database_url(admin_url: str, dbname: str) -> str:
    parts = urllib.parse.urlsplit(admin_url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + dbname))


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A freshly created database on the test server, dropped (connections and all) afterwards."""
    name = f"gwtest_{uuid.uuid4().hex}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=10) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield database_url(POSTGRES_ADMIN_URL, name)
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=10) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty, not yet created store of each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/data/gateway.db"
    else:
        with postgres_database() as pg_url:
            yield pg_url


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[Storage]:
    storage = open_storage(url)
    await storage.open()
    try:
        yield storage
    finally:
        await storage.close()


def run(url: str, work: Callable[[Storage], Awaitable[T]]) -> T:
    """Open the store at ``url``, run ``work`` on it in a fresh event loop, close it."""

    async def main() -> T:
        async with opened(url) as storage:
            return await work(storage)

    return asyncio.run(main())


def event(
    dedupe_key: str = "txn-1", partner: str = "kochava", event_id: str | None = None, **fields: Any
) -> AttributionEvent:
    fields.setdefault("kind", "install")
    fields.setdefault("attributed", True)
    return AttributionEvent(
        partner=partner,
        dedupe_key=dedupe_key,
        event_id=event_id or f"evt_{uuid.uuid4().hex}",
        received_at=fields.pop("received_at", T0),
        **fields,
    )


def full_event() -> AttributionEvent:
    """Every field set, with the values most likely to be mangled on the way through."""
    return AttributionEvent(
        kind="reengagement",
        attributed=True,
        event_name="purchase — 購入 ✓",
        source="Réseau Ünïcode 🚀",
        campaign="été 2024 / 夏",
        adgroup="groupe «A»",
        ad="créa 🎬 #1",
        source_id="src-1",
        campaign_id="camp-42",
        adgroup_id="ag-7",
        ad_id="ad-9",
        event_time=datetime(2024, 5, 1, 10, 11, 12, 345678, tzinfo=UTC),
        install_time=datetime(2024, 4, 30, 23, 59, 59, tzinfo=UTC),
        touch_time=datetime(2024, 4, 30, 23, 0, 0, 1, tzinfo=UTC),
        platform="ios",
        app_id="com.example.app",
        idfa="6D92078A-8246-4BA4-AE5B-76104861E7DC",
        idfv="0B5B7D7E-3A4B-4C5D-8E9F-0A1B2C3D4E5F",
        google_ad_id="38400000-8cf0-11bd-b23e-10b96e40000d",
        android_id="9774d56d682e549c",
        windows_ad_id="win-ad-1",
        braze_id="braze-ßø",
        external_id="user-ñ-17",
        partner_device_id="kd-123",
        revenue=Decimal("1234.56789012345678901234567890"),
        currency="EUR",
        country="FR",
        dedupe_key="txn-ünï-🔑",
        partner="kochava",
        event_id="evt_full",
        received_at=datetime(2024, 5, 1, 10, 11, 13, 999999, tzinfo=UTC),
        raw={
            "nested": {"list": [1, 2.5, "x", None, True, False], "deep": {"k": "v"}},
            "emoji": "😀👍🏽",
            "cjk": "中文字符",
            "big": 12345678901234567890,
            'quote"key': "back\\slash\nnewline\ttab",
            "empty": {},
        },
    )


def key_record(
    key_id: str, partner: str = "kochava", created_at: datetime = T0, hint: str = "ab12"
) -> KeyRecord:
    return KeyRecord(key_id=key_id, partner=partner, hint=hint, created_at=created_at)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- events: idempotency ---------------------------------------------------------------------------


def test_store_then_duplicate_returns_first_event_id(url: str) -> None:
    async def work(storage: Storage) -> tuple[list[StoreResult], list[StoreResult], int]:
        first = await storage.store([event(event_id="evt_a")])
        again = await storage.store([event(event_id="evt_b")])
        return first, again, await storage.count()

    first, again, count = run(url, work)
    assert first == [StoreResult(stored=True, event_id="evt_a")]
    assert again == [StoreResult(stored=False, event_id="evt_a")]
    assert count == 1


def test_same_dedupe_key_under_another_partner_is_another_event(url: str) -> None:
    async def work(storage: Storage) -> tuple[list[StoreResult], list[StoreResult]]:
        a = await storage.store([event("same", partner="kochava", event_id="evt_k")])
        b = await storage.store([event("same", partner="appsflyer", event_id="evt_a")])
        return a, b

    a, b = run(url, work)
    assert a == [StoreResult(stored=True, event_id="evt_k")]
    assert b == [StoreResult(stored=True, event_id="evt_a")]


def test_fifty_concurrent_stores_of_one_event_store_one_row(url: str) -> None:
    async def work(storage: Storage) -> tuple[list[list[StoreResult]], int, list[str]]:
        results = await asyncio.gather(
            *(storage.store([event("retry", event_id=f"evt_{n}")]) for n in range(50))
        )
        stored = await storage.events()
        return list(results), await storage.count(), [e.event_id for e in stored]

    results, count, stored_ids = run(url, work)
    assert count == 1
    flat = [r for batch in results for r in batch]
    assert len(flat) == 50
    assert sum(r.stored for r in flat) == 1
    assert {r.event_id for r in flat} == set(stored_ids)
    assert len(stored_ids) == 1


def test_concurrent_stores_from_two_instances_store_one_row(url: str) -> None:
    """Two open stores on the same data, as two gateway processes would have."""

    async def main() -> tuple[list[list[StoreResult]], int]:
        async with opened(url) as one, opened(url) as two:
            results = await asyncio.gather(
                *(
                    (one if n % 2 else two).store([event("shared", event_id=f"evt_{n}")])
                    for n in range(20)
                )
            )
            return list(results), await one.count()

    results, count = asyncio.run(main())
    assert count == 1
    flat = [r for batch in results for r in batch]
    assert sum(r.stored for r in flat) == 1
    assert len({r.event_id for r in flat}) == 1


def test_batch_with_a_repeated_dedupe_key_stores_it_once(url: str) -> None:
    async def work(storage: Storage) -> tuple[list[StoreResult], list[StoreResult], int]:
        batch = await storage.store(
            [event("k1", event_id="e1"), event("k2", event_id="e2"), event("k1", event_id="e3")]
        )
        mixed = await storage.store([event("k3", event_id="e4"), event("k2", event_id="e5")])
        return batch, mixed, await storage.count()

    batch, mixed, count = run(url, work)
    assert batch == [
        StoreResult(stored=True, event_id="e1"),
        StoreResult(stored=True, event_id="e2"),
        StoreResult(stored=False, event_id="e1"),
    ]
    assert mixed == [
        StoreResult(stored=True, event_id="e4"),
        StoreResult(stored=False, event_id="e2"),
    ]
    assert count == 3


def test_concurrent_batches_in_opposite_orders_all_succeed(url: str) -> None:
    """Overlapping batches in opposite key orders (a deadlock for PostgreSQL) still succeed."""

    async def main() -> tuple[list[list[StoreResult]], int]:
        async with opened(url) as one, opened(url) as two:
            results: list[list[StoreResult]] = []
            for n in range(5):
                keys = [f"r{n}-{i}" for i in range(10)]
                results += await asyncio.gather(
                    one.store([event(k, event_id=f"a{n}-{k}") for k in keys]),
                    two.store([event(k, event_id=f"b{n}-{k}") for k in reversed(keys)]),
                )
            return results, await one.count()

    results, count = asyncio.run(main())
    assert count == 50
    for n in range(5):
        forward, backward = results[2 * n], results[2 * n + 1]
        assert [r.event_id for r in forward] == [r.event_id for r in reversed(backward)]
        assert all(a.stored != b.stored for a, b in zip(forward, reversed(backward), strict=True))


def test_a_failing_batch_stores_nothing(url: str) -> None:
    """One transaction: an event that cannot be stored (its event_id is taken) undoes the batch."""

    async def work(storage: Storage) -> tuple[int, list[str]]:
        await storage.store([event("k1", event_id="taken")])
        with pytest.raises(StorageUnavailable):
            await storage.store([event("k2", event_id="new"), event("k3", event_id="taken")])
        # The store is still usable afterwards.
        await storage.store([event("k4", event_id="later")])
        return await storage.count(), [e.event_id for e in await storage.events()]

    count, ids = run(url, work)
    assert count == 2
    assert ids == ["later", "taken"]


def test_empty_batch(url: str) -> None:
    assert run(url, lambda s: s.store([])) == []


# -- events: reading back ------------------------------------------------------------------------


def test_events_newest_first_filtered_and_limited(url: str) -> None:
    async def work(storage: Storage) -> dict[str, list[str]]:
        for n in range(3):
            await storage.store([event(f"k{n}", partner="kochava", event_id=f"k{n}")])
            await storage.store([event(f"a{n}", partner="appsflyer", event_id=f"a{n}")])
        await storage.store([event("k3", event_id="k3"), event("k4", event_id="k4")])

        async def ids(partner: str | None = None, limit: int = 50) -> list[str]:
            return [e.event_id for e in await storage.events(partner, limit)]

        return {
            "all": await ids(),
            "kochava": await ids("kochava"),
            "appsflyer": await ids("appsflyer"),
            "limit": await ids(limit=2),
            "partner_limit": await ids("appsflyer", 1),
            "none": await ids("branch"),
            "zero": await ids(limit=0),
        }

    got = run(url, work)
    assert got["all"] == ["k4", "k3", "a2", "k2", "a1", "k1", "a0", "k0"]
    assert got["kochava"] == ["k4", "k3", "k2", "k1", "k0"]
    assert got["appsflyer"] == ["a2", "a1", "a0"]
    assert got["limit"] == ["k4", "k3"]
    assert got["partner_limit"] == ["a2"]
    assert got["none"] == []
    assert got["zero"] == []


def test_events_round_trip_every_field_exactly(url: str) -> None:
    original = full_event()
    minimal = AttributionEvent(kind="event", attributed=False, dedupe_key="m", event_id="evt_min")

    async def work(storage: Storage) -> list[AttributionEvent]:
        await storage.store([original, minimal])
        return await storage.events()

    back_minimal, back = run(url, work)
    assert back == original
    assert back_minimal == minimal
    # Equality of datetimes and Decimals is lenient; check what it lets through too.
    assert str(back.revenue) == "1234.56789012345678901234567890"
    for name in ("event_time", "install_time", "touch_time", "received_at"):
        value = getattr(back, name)
        assert value is not None and value.utcoffset() == timedelta(0), name
        assert value == getattr(original, name), name
    assert back.raw == original.raw
    assert back.received_at is not None and back.received_at.microsecond == 999999


def test_count(url: str) -> None:
    async def work(storage: Storage) -> tuple[int, int, int, int, int]:
        empty = await storage.count()
        await storage.store([event("k1"), event("k2"), event("k1")])
        await storage.store([event("x", partner="appsflyer")])
        await storage.store([event("k2")])
        return (
            empty,
            await storage.count(),
            await storage.count("kochava"),
            await storage.count("appsflyer"),
            await storage.count("branch"),
        )

    assert run(url, work) == (0, 3, 2, 1, 0)


# -- events: replace (a re-map), find, scan -------------------------------------------------------


def test_replace_rewrites_a_stored_event_keeping_its_id_and_received_at(url: str) -> None:
    later = T0 + timedelta(days=3)
    original = full_event()
    remapped = msgspec.structs.replace(
        original,
        event_id="evt_new_id",
        received_at=later,
        kind="install",
        attributed=False,
        campaign="fixed campaign",
        revenue=None,
    )

    async def work(storage: Storage) -> dict[str, Any]:
        await storage.store([original, event("other", event_id="evt_other")])
        first = await storage.replace([remapped, event("new", event_id="evt_fresh")])
        again = await storage.replace([remapped])
        retry = await storage.store([remapped])  # a postback retry after the re-map
        return {
            "first": first,
            "again": again,
            "retry": retry,
            "events": {e.dedupe_key: e for e in await storage.events()},
            "count": await storage.count(),
        }

    got = run(url, work)
    assert got["first"] == [
        ReplaceResult(outcome="updated", event_id=original.event_id),
        ReplaceResult(outcome="stored", event_id="evt_fresh"),
    ]
    assert got["again"] == [ReplaceResult(outcome="unchanged", event_id=original.event_id)]
    assert got["retry"] == [StoreResult(stored=False, event_id=original.event_id)]
    assert got["count"] == 3
    stored = got["events"][original.dedupe_key]
    assert stored == msgspec.structs.replace(
        remapped, event_id=original.event_id, received_at=original.received_at
    )
    assert stored.campaign == "fixed campaign" and stored.kind == "install"
    assert stored.attributed is False and stored.revenue is None
    assert got["events"]["other"].event_id == "evt_other"  # other events untouched
    assert got["events"]["new"].received_at == T0


def test_replace_in_one_batch_with_a_repeated_key_and_across_partners(url: str) -> None:
    async def work(storage: Storage) -> tuple[list[ReplaceResult], list[AttributionEvent]]:
        await storage.store([event("k1", partner="appsflyer", event_id="af1", campaign="af")])
        results = await storage.replace(
            [
                event("k1", event_id="e1", campaign="a"),
                event("k1", event_id="e2", campaign="b"),
                event("k1", event_id="e3", campaign="b"),
            ]
        )
        return results, await storage.events()

    results, events = run(url, work)
    assert results == [
        ReplaceResult(outcome="stored", event_id="e1"),
        ReplaceResult(outcome="updated", event_id="e1"),
        ReplaceResult(outcome="unchanged", event_id="e1"),
    ]
    assert [(e.partner, e.event_id, e.campaign) for e in events] == [
        ("kochava", "e1", "b"),
        ("appsflyer", "af1", "af"),  # the same dedupe key of another partner is another event
    ]


def test_a_failing_replace_changes_nothing(url: str) -> None:
    async def work(storage: Storage) -> list[AttributionEvent]:
        await storage.store([event("k1", event_id="e1", campaign="old"), event("k2", event_id="t")])
        with pytest.raises(StorageUnavailable):
            # k1 would be rewritten, but k3's event_id is taken: the whole call is undone.
            await storage.replace(
                [event("k1", event_id="x", campaign="new"), event("k3", event_id="t")]
            )
        return await storage.events()

    assert [(e.dedupe_key, e.campaign) for e in run(url, work)] == [("k2", None), ("k1", "old")]


def test_find_by_dedupe_keys(url: str) -> None:
    async def work(storage: Storage) -> list[dict[str, AttributionEvent]]:
        await storage.store([event(f"k{n}", event_id=f"e{n}") for n in range(600)])
        await storage.store([event("k1", partner="appsflyer", event_id="af1")])
        return [
            await storage.find("kochava", ["k1", "k599", "missing", "k1"]),
            await storage.find("appsflyer", ["k1", "k2"]),
            await storage.find("branch", ["k1"]),
            await storage.find("kochava", []),
            await storage.find("kochava", [f"k{n}" for n in range(600)]),  # more than one query
        ]

    mixed, other, none, empty, every = run(url, work)
    assert {k: e.event_id for k, e in mixed.items()} == {"k1": "e1", "k599": "e599"}
    assert {k: e.event_id for k, e in other.items()} == {"k1": "af1"}
    assert none == {} and empty == {}
    assert len(every) == 600 and every["k0"] == event("k0", event_id="e0")


def test_scan_reads_every_event_oldest_first_in_pages(url: str) -> None:
    async def work(storage: Storage) -> dict[str, list[str]]:
        for n in range(5):
            await storage.store([event(f"k{n}", event_id=f"k{n}")])
            await storage.store([event(f"a{n}", partner="appsflyer", event_id=f"a{n}")])

        async def pages(partner: str | None, size: int) -> list[str]:
            seen: list[str] = []
            after = None
            while page := await storage.scan(partner, after, size):
                assert len(page) <= size
                seen += [e.event_id for e in page]
                after = page[-1].event_id
            return seen

        return {
            "all": await pages(None, 3),
            "kochava": await pages("kochava", 2),
            "one_page": [e.event_id for e in await storage.scan(limit=100)],
            "after": [e.event_id for e in await storage.scan("appsflyer", "k2", 10)],
            "unknown": [e.event_id for e in await storage.scan(None, "no-such-event", 10)],
        }

    got = run(url, work)
    assert got["all"] == [f"{p}{n}" for n in range(5) for p in ("k", "a")]
    assert got["kochava"] == [f"k{n}" for n in range(5)]
    assert got["one_page"] == got["all"]
    assert got["after"] == ["a2", "a3", "a4"]
    assert got["unknown"] == []


def test_data_survives_close_and_reopen(url: str) -> None:
    run(url, lambda s: s.store([event("k1", event_id="first")]))
    run(url, lambda s: s.add_key(key_record("key_1"), "hash-1"))

    async def work(storage: Storage) -> tuple[list[StoreResult], int, list[tuple[str, str]]]:
        again = await storage.store([event("k1", event_id="second")])
        return again, await storage.count(), await storage.active_key_hashes("kochava")

    again, count, hashes = run(url, work)
    assert again == [StoreResult(stored=False, event_id="first")]
    assert count == 1
    assert hashes == [("key_1", "hash-1")]


def test_several_instances_open_a_new_store_at_once(url: str) -> None:
    """Schema creation is safe when several processes start together on an empty database."""

    async def main() -> list[int]:
        storages = [open_storage(url) for _ in range(5)]
        await asyncio.gather(*(s.open() for s in storages))
        try:
            await storages[0].store([event("k")])
            return [await s.count() for s in storages]
        finally:
            await asyncio.gather(*(s.close() for s in storages))

    assert asyncio.run(main()) == [1] * 5


def test_sqlite_opens_a_new_database_another_process_is_writing(tmp_path: Path) -> None:
    """Turning on WAL while another connection writes a new database's first rows (still in
    rollback-journal mode, as a worker that started first) fails at once in SQLite, busy
    timeout or not; opening the storage waits for the other writer instead."""
    path = tmp_path / "gateway.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE first_writer (x)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO first_writer VALUES (1)")
    done = threading.Timer(0.3, other.execute, ("COMMIT",))

    async def main() -> int:
        storage = open_storage(f"sqlite:///{path}")
        await storage.open()
        try:
            await storage.store([event("k")])
            return await storage.count()
        finally:
            await storage.close()

    started = time.monotonic()
    done.start()
    try:
        assert asyncio.run(main()) == 1
    finally:
        done.join()
        other.close()
    assert time.monotonic() - started >= 0.3  # it waited for the other writer


def test_ping(url: str) -> None:
    assert run(url, lambda s: s.ping()) is None


# -- API keys --------------------------------------------------------------------------------------


def test_keys_add_list_and_active_hashes(url: str) -> None:
    async def work(storage: Storage) -> dict[str, Any]:
        await storage.add_key(key_record("key_b", created_at=T0 + timedelta(seconds=1)), "hash-b")
        await storage.add_key(key_record("key_a", created_at=T0, hint="zz99"), "hash-a")
        await storage.add_key(key_record("key_c", partner="appsflyer"), "hash-c")
        return {
            "all": await storage.keys(),
            "kochava": await storage.keys("kochava"),
            "none": await storage.keys("branch"),
            "hashes": sorted(await storage.active_key_hashes("kochava")),
            "hashes_af": await storage.active_key_hashes("appsflyer"),
            "hashes_none": await storage.active_key_hashes("branch"),
        }

    got = run(url, work)
    assert [k.key_id for k in got["all"]] == ["key_a", "key_c", "key_b"]
    assert [k.key_id for k in got["kochava"]] == ["key_a", "key_b"]
    assert got["none"] == []
    first = got["kochava"][0]
    assert first == KeyRecord(key_id="key_a", partner="kochava", hint="zz99", created_at=T0)
    assert first.created_at.utcoffset() == timedelta(0)
    assert first.revoked_at is None and first.last_used_at is None
    assert got["hashes"] == [("key_a", "hash-a"), ("key_b", "hash-b")]
    assert got["hashes_af"] == [("key_c", "hash-c")]
    assert got["hashes_none"] == []


def test_key_times_are_timezone_aware(url: str) -> None:
    paris = timezone(timedelta(hours=2))
    created = datetime(2024, 5, 1, 14, 0, 0, 123456, tzinfo=paris)

    async def work(storage: Storage) -> list[KeyRecord]:
        await storage.add_key(key_record("key_p", created_at=created), "hash-p")
        await storage.revoke_key("key_p", datetime(2024, 6, 1, 9, 30, tzinfo=UTC))
        return await storage.keys()

    (record,) = run(url, work)
    assert record.created_at == created  # the same instant
    assert record.created_at.tzinfo is not None
    assert record.revoked_at == datetime(2024, 6, 1, 9, 30, tzinfo=UTC)
    assert record.revoked_at.utcoffset() == timedelta(0)


def test_revoke_key_once(url: str) -> None:
    revoked_at = datetime(2024, 6, 1, 9, 30, 15, 250000, tzinfo=UTC)

    async def work(storage: Storage) -> dict[str, Any]:
        await storage.add_key(key_record("key_old"), "hash-old")
        await storage.add_key(key_record("key_new", created_at=T0 + timedelta(days=1)), "hash-new")
        return {
            "first": await storage.revoke_key("key_old", revoked_at),
            "second": await storage.revoke_key("key_old", revoked_at + timedelta(hours=1)),
            "unknown": await storage.revoke_key("key_missing", revoked_at),
            "hashes": await storage.active_key_hashes("kochava"),
            "keys": await storage.keys("kochava"),
        }

    got = run(url, work)
    assert got["first"] is True
    assert got["second"] is False
    assert got["unknown"] is False
    assert got["hashes"] == [("key_new", "hash-new")]
    old, new = got["keys"]
    assert old.key_id == "key_old" and old.revoked_at == revoked_at
    assert old.revoked_at is not None and old.revoked_at.utcoffset() == timedelta(0)
    assert new.key_id == "key_new" and new.revoked_at is None


def test_adding_a_key_hash_twice_fails_as_unavailable(url: str) -> None:
    async def work(storage: Storage) -> list[KeyRecord]:
        await storage.add_key(key_record("key_1"), "same-hash")
        with pytest.raises(StorageUnavailable):
            await storage.add_key(key_record("key_2"), "same-hash")
        return await storage.keys()

    assert [k.key_id for k in run(url, work)] == ["key_1"]


# -- storage unavailable -----------------------------------------------------------------------


def unreachable_url(kind: str, tmp_path: Path) -> str:
    if kind == "postgres-no-server":
        return f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    if kind == "postgres-no-database":
        return database_url(POSTGRES_ADMIN_URL, f"gwtest_missing_{uuid.uuid4().hex}")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where a folder should be")
    return f"sqlite:///{blocker}/gateway.db"


@pytest.mark.parametrize(
    "kind",
    [
        "postgres-no-server",
        "postgres-no-database",
        "sqlite-under-a-file",
    ],
)
def test_unreachable_storage_raises_storage_unavailable(kind: str, tmp_path: Path) -> None:
    url = unreachable_url(kind, tmp_path)

    async def attempt() -> None:
        storage = open_storage(url)
        try:
            await storage.open()
            await storage.store([event()])
        finally:
            with contextlib.suppress(StorageUnavailable):
                await storage.close()

    with pytest.raises(StorageUnavailable):
        asyncio.run(attempt())


def test_closed_storage_raises_storage_unavailable(url: str) -> None:
    async def main() -> None:
        storage = open_storage(url)
        await storage.open()
        await storage.close()
        for call in (
            lambda: storage.store([event()]),
            lambda: storage.events(),
            lambda: storage.count(),
            lambda: storage.ping(),
            lambda: storage.active_key_hashes("kochava"),
        ):
            with pytest.raises(StorageUnavailable):
                await call()

    asyncio.run(main())


def test_postgres_server_going_away_raises_storage_unavailable() -> None:
    """Connections killed under an open store: calls fail as StorageUnavailable, then recover."""

    async def main(pg_url: str) -> tuple[list[str], int]:
        seen: list[str] = []
        async with opened(pg_url) as storage:
            await storage.store([event("k1")])
            dbname = urllib.parse.urlsplit(pg_url).path.lstrip("/")
            async with await psycopg.AsyncConnection.connect(
                POSTGRES_ADMIN_URL, autocommit=True
            ) as admin:
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (dbname,),
                )
            for _ in range(3):
                try:
                    await storage.store([event("k2")])
                    seen.append("ok")
                except StorageUnavailable:
                    seen.append("unavailable")
            return seen, await storage.count()

    with postgres_database() as pg_url:
        seen, count = asyncio.run(main(pg_url))
    # The pool checks a connection before lending it, so the store may not even notice.
    assert set(seen) <= {"ok", "unavailable"}
    assert "ok" in seen
    assert count == 2
