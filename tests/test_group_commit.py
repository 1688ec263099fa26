"""Group commit: store() calls that arrive together are written in one transaction; each is
answered only once that transaction is committed; a call that fails fails alone; and the
idempotency of the storage contract (tests/test_storage.py) holds inside a group exactly as
across groups. On both backends: SQLite (gateway/sqlite_thread.py: one transaction, a savepoint
per call) and PostgreSQL (gateway/storage/postgres.py: one transaction and one multi-row INSERT
per group; a group that fails is retried call by call).

Real SQLite files and PostgreSQL databases; no mocks. "Together" is made certain, not left to
timing: calls started in the same turn of the event loop form one group.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway.errors import StorageUnavailable
from gateway.sqlite_thread import SQLiteThread
from gateway.storage import Storage, StoreResult, open_storage
from tests.test_storage import event, url

__all__ = ["url"]  # the fixture: an empty store of each backend


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def committed_ids(url: str) -> set[str]:
    """Event ids committed, read over a connection of our own."""
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            return {row[0] for row in conn.execute("SELECT event_id FROM events")}
        finally:
            conn.close()
    with psycopg.connect(url) as pg:
        return {row[0] for row in pg.execute("SELECT event_id FROM events")}


def transactions(url: str) -> int:
    """How many transactions wrote the stored events (PostgreSQL: distinct xmin)."""
    with psycopg.connect(url) as pg:
        row = pg.execute("SELECT count(DISTINCT xmin::text) FROM events").fetchone()
    return int(row[0]) if row else 0


async def open_url(url: str) -> Storage:
    storage = open_storage(url)
    await storage.open()
    return storage


def test_concurrent_stores_share_one_transaction(url: str) -> None:
    async def main() -> tuple[list[list[StoreResult]], int]:
        storage = await open_url(url)
        try:
            groups = getattr(storage, "_db", None)
            before = groups.groups if isinstance(groups, SQLiteThread) else 0
            results = await asyncio.gather(
                *(storage.store([event(f"k{n}", event_id=f"e{n}")]) for n in range(50))
            )
            if isinstance(groups, SQLiteThread):
                assert groups.groups - before == 1  # one BEGIN … COMMIT, one fsync, for all
            return list(results), await storage.count()
        finally:
            await storage.close()

    results, count = run(main())
    assert [r[0] for r in results] == [StoreResult(True, f"e{n}") for n in range(50)]
    assert count == 50
    if url.startswith("postgresql"):
        assert transactions(url) == 1


def test_each_store_is_answered_only_once_committed(url: str) -> None:
    """Whenever a store() returns, its event is already committed: another connection sees it."""

    async def main() -> list[tuple[str, bool]]:
        storage = await open_url(url)
        seen: list[tuple[str, bool]] = []
        try:
            tasks = [
                asyncio.create_task(storage.store([event(f"k{n}", event_id=f"e{n}")]))
                for n in range(40)
            ]
            for next_done in asyncio.as_completed(tasks):
                (result,) = await next_done
                seen.append((result.event_id, result.event_id in committed_ids(url)))
        finally:
            await storage.close()
        return seen

    seen = run(main())
    assert len(seen) == 40
    assert all(visible for _, visible in seen)


def test_a_failing_store_in_a_group_fails_alone(url: str) -> None:
    """The stores before and after it in the group are kept (SQLite: its savepoint is rolled
    back; PostgreSQL: the group is rolled back and its calls are stored one by one)."""

    async def main() -> tuple[list[Any], int, set[str]]:
        storage = await open_url(url)
        try:
            await storage.store([event("first", event_id="taken")])
            outcomes = await asyncio.gather(
                storage.store([event("a", event_id="ea")]),
                # "k-new" would be new, but "taken" is: the whole call fails, k-new included
                storage.store([event("k-new", event_id="eb"), event("b", event_id="taken")]),
                storage.store([event("c", event_id="ec")]),
                return_exceptions=True,
            )
            stored = {e.event_id for e in await storage.events(limit=100)}
            return list(outcomes), await storage.count(), stored
        finally:
            await storage.close()

    outcomes, _, stored = run(main())
    assert outcomes[0] == [StoreResult(True, "ea")]
    assert isinstance(outcomes[1], StorageUnavailable)
    assert outcomes[2] == [StoreResult(True, "ec")]
    assert stored == {"taken", "ea", "ec"}


def test_a_failing_single_event_store_in_a_group_fails_alone(url: str) -> None:
    """The same with a call of one event (SQLite writes it without a savepoint: the failed
    statement undoes itself)."""

    async def main() -> tuple[list[Any], set[str]]:
        storage = await open_url(url)
        try:
            await storage.store([event("first", event_id="taken")])
            outcomes = await asyncio.gather(
                storage.store([event("a", event_id="ea")]),
                storage.store([event("b", event_id="taken")]),
                storage.store([event("c", event_id="ec")]),
                return_exceptions=True,
            )
            return list(outcomes), {e.event_id for e in await storage.events(limit=100)}
        finally:
            await storage.close()

    outcomes, stored = run(main())
    assert outcomes[0] == [StoreResult(True, "ea")]
    assert isinstance(outcomes[1], StorageUnavailable)
    assert outcomes[2] == [StoreResult(True, "ec")]
    assert stored == {"taken", "ea", "ec"}


def test_same_dedupe_key_twice_in_one_group(url: str) -> None:
    """Two calls with one dedupe key in the same group: one stored, the other told it is a
    duplicate of that very event, exactly as if they had been two transactions."""

    async def main() -> tuple[list[list[StoreResult]], int]:
        storage = await open_url(url)
        try:
            results = await asyncio.gather(
                storage.store([event("same", event_id="e1")]),
                storage.store([event("same", event_id="e2"), event("other", event_id="e3")]),
                storage.store([event("same", event_id="e4")]),
            )
            return list(results), await storage.count()
        finally:
            await storage.close()

    results, count = run(main())
    if url.startswith("postgresql"):
        assert transactions(url) == 1  # one group, so one transaction
    assert results == [
        [StoreResult(True, "e1")],
        [StoreResult(False, "e1"), StoreResult(True, "e3")],
        [StoreResult(False, "e1")],
    ]
    assert count == 2


def test_a_rolled_back_store_does_not_count_as_the_first_of_its_key(url: str) -> None:
    """A later store in the group with the key of a failed one is new, not a duplicate of an
    event that was never stored."""

    async def main() -> tuple[list[Any], list[str]]:
        storage = await open_url(url)
        try:
            await storage.store([event("x", event_id="taken")])
            outcomes = await asyncio.gather(
                storage.store([event("key", event_id="e1"), event("y", event_id="taken")]),
                storage.store([event("key", event_id="e2")]),
                return_exceptions=True,
            )
            return list(outcomes), [e.event_id for e in await storage.events(limit=10)]
        finally:
            await storage.close()

    outcomes, ids = run(main())
    assert isinstance(outcomes[0], StorageUnavailable)
    assert outcomes[1] == [StoreResult(True, "e2")]
    assert sorted(ids) == ["e2", "taken"]


def test_groups_from_two_instances_store_one_row_per_key(url: str) -> None:
    """Two stores on one database (two gateway processes), each grouping: one row per key."""

    async def main() -> tuple[list[list[StoreResult]], int]:
        one, two = await open_url(url), await open_url(url)
        try:
            results = await asyncio.gather(
                *(
                    (one if n % 2 else two).store([event(f"k{n % 10}", event_id=f"e{n}")])
                    for n in range(60)
                )
            )
            return list(results), await one.count()
        finally:
            await one.close()
            await two.close()

    results, count = run(main())
    assert count == 10
    flat = [r for batch in results for r in batch]
    assert sum(r.stored for r in flat) == 10
    by_key: dict[str, set[str]] = {}
    for n, r in enumerate(flat):
        by_key.setdefault(f"k{n % 10}", set()).add(r.event_id)
    assert all(len(ids) == 1 for ids in by_key.values())  # every caller got the stored id


def test_a_store_made_just_before_close_is_written(url: str) -> None:
    """Closing the store does not drop a store call that is grouped but not yet sent."""

    async def main() -> tuple[list[StoreResult], int]:
        storage = await open_url(url)
        task = asyncio.create_task(storage.store([event("k", event_id="e1")]))
        await asyncio.sleep(0)  # the call is made and waits in its group
        await storage.close()
        result = await asyncio.wait_for(task, 30)
        again = await open_url(url)
        try:
            return result, await again.count()
        finally:
            await again.close()

    assert run(main()) == ([StoreResult(True, "e1")], 1)


# -- the thread itself -------------------------------------------------------------------------

DEFERRED_SCHEMA = """
CREATE TABLE IF NOT EXISTS parent (id INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS child (
    id INTEGER PRIMARY KEY,
    parent INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED
);
PRAGMA foreign_keys = ON;
"""


def test_a_failing_commit_fails_every_piece_of_its_group(tmp_path: Path) -> None:
    """A deferred constraint is checked at COMMIT: the group is rolled back and every caller
    hears of it (none of them was stored); the thread serves on afterwards."""
    path = tmp_path / "t.db"

    async def main() -> tuple[list[Any], int, int]:
        db = SQLiteThread(path, DEFERRED_SCHEMA, StorageUnavailable)
        await db.open()
        try:
            outcomes = await asyncio.gather(
                db.grouped(lambda c: c.execute("INSERT INTO child VALUES (1, NULL)").rowcount),
                db.grouped(lambda c: c.execute("INSERT INTO child VALUES (2, 99)").rowcount),
                db.grouped(lambda c: c.execute("INSERT INTO child VALUES (3, NULL)").rowcount),
                return_exceptions=True,
            )
            after = await db.grouped(lambda c: c.execute("INSERT INTO child VALUES (4, NULL)"))
            del after
            count = await db.run(lambda c: c.execute("SELECT count(*) FROM child").fetchone()[0])
            return list(outcomes), count, db.groups
        finally:
            await db.close()

    outcomes, count, groups = run(main())
    assert all(isinstance(o, StorageUnavailable) for o in outcomes)
    assert count == 1  # only the insert made after the failed group
    assert groups == 1


def test_a_bug_in_one_piece_fails_only_that_piece(tmp_path: Path) -> None:
    async def main() -> list[Any]:
        db = SQLiteThread(tmp_path / "t.db", DEFERRED_SCHEMA, StorageUnavailable)
        await db.open()

        def broken(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO parent VALUES (2)")
            raise KeyError("a bug")

        try:
            outcomes = await asyncio.gather(
                db.grouped(lambda c: c.execute("INSERT INTO parent VALUES (1)").rowcount),
                db.grouped(broken),
                db.grouped(lambda c: c.execute("INSERT INTO parent VALUES (3)").rowcount),
                return_exceptions=True,
            )
            ids = await db.run(lambda c: [r[0] for r in c.execute("SELECT id FROM parent")])
            return [*outcomes, sorted(ids)]
        finally:
            await db.close()

    one, broken, three, ids = run(main())
    assert one == 1 and three == 1
    assert isinstance(broken, KeyError)
    assert ids == [1, 3]


def test_a_group_window_gathers_work_arriving_soon_after(tmp_path: Path) -> None:
    async def main() -> int:
        db = SQLiteThread(
            tmp_path / "t.db", DEFERRED_SCHEMA, StorageUnavailable, group_window_s=0.2
        )
        await db.open()
        try:

            async def later(n: int) -> None:
                await asyncio.sleep(0.01 * n)  # separate turns of the loop, well in the window
                await db.grouped(lambda c: c.execute("INSERT INTO parent VALUES (?)", (n,)))

            await asyncio.gather(*(later(n) for n in range(5)))
            return db.groups
        finally:
            await db.close()

    assert run(main()) == 1


def test_work_submitted_just_before_close_is_served(tmp_path: Path) -> None:
    async def main() -> tuple[int, Any]:
        db = SQLiteThread(tmp_path / "t.db", DEFERRED_SCHEMA, StorageUnavailable)
        await db.open()
        task = asyncio.create_task(
            db.grouped(lambda c: c.execute("INSERT INTO parent VALUES (7)").rowcount)
        )
        await asyncio.sleep(0)  # the call is made, not yet handed to the thread
        await db.close()
        with pytest.raises(StorageUnavailable):
            await db.run(lambda c: None)
        return await asyncio.wait_for(task, 10), None

    assert run(main())[0] == 1


# -- PostgreSQL: key look-ups shared within a turn of the loop ----------------------------------


def test_postgres_key_reads_are_shared_and_never_older_than_the_caller() -> None:
    """Reads of one partner's keys made together share one query, sent after all of them were
    made; a read made after a revocation committed never gets the answer of an earlier query."""
    from datetime import UTC, datetime

    from tests.test_storage import key_record, postgres_database

    async def main(pg_url: str) -> tuple[list[Any], list[Any], list[Any]]:
        storage = await open_url(pg_url)
        other = await open_url(pg_url)  # another process, as the CLI would be
        try:
            await storage.add_key(key_record("key_1"), "hash-1")
            together = await asyncio.gather(
                *(storage.active_key_hashes("kochava") for _ in range(30))
            )
            in_flight = asyncio.create_task(storage.active_key_hashes("kochava"))
            await asyncio.sleep(0)
            await asyncio.sleep(0)  # that query is under way now
            await other.revoke_key("key_1", datetime.now(UTC))
            after = await asyncio.gather(*(storage.active_key_hashes("kochava") for _ in range(5)))
            await in_flight
            return list(together), list(after), [await storage.active_key_hashes("kochava")]
        finally:
            await storage.close()
            await other.close()

    with postgres_database() as pg_url:
        together, after, last = run(main(pg_url))
    assert together == [[("key_1", "hash-1")]] * 30
    assert after == [[]] * 5
    assert last == [[]]
