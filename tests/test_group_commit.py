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
import time
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


# -- the thread: grouped_batch -------------------------------------------------------------------

BATCH_SCHEMA = """
CREATE TABLE IF NOT EXISTS item (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL CHECK (name <> 'bad')
);
"""

#: A piece of batched work: a row of ``item``.
Piece = tuple[int, str | None]


def insert_rows(conn: sqlite3.Connection, table: str, rows: list[Any]) -> None:
    """All ``rows`` (pairs) in one multi-row INSERT."""
    marks = ", ".join(["(?, ?)"] * len(rows))
    conn.execute(f"INSERT INTO {table} VALUES {marks}", [v for row in rows for v in row])  # noqa: S608


class Inserts:
    """A batch function: all its pieces in one multi-row INSERT, each answered with its id.
    Keeps the pieces of every call. ``fail_on``: a call holding that name raises a bug of its
    own after its INSERT."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[list[Piece]] = []
        self.fail_on = fail_on

    def __call__(self, conn: sqlite3.Connection, pieces: list[Piece]) -> list[int]:
        self.calls.append(list(pieces))
        insert_rows(conn, "item", pieces)
        if self.fail_on is not None and any(name == self.fail_on for _, name in pieces):
            raise KeyError("a bug in the batch function")
        return [piece_id for piece_id, _ in pieces]


def stored_items(path: Path) -> dict[int, str]:
    """The committed rows of ``item``, read over a connection of our own."""
    conn = sqlite3.connect(path)
    try:
        return {int(i): str(name) for i, name in conn.execute("SELECT id, name FROM item")}
    finally:
        conn.close()


def write_lock_is_free(path: Path) -> bool:
    """Whether another connection can take the write lock at once (no transaction left open)."""
    conn = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


def wal_commits(path: Path) -> int:
    """Transactions committed to the write-ahead log since it was last reset: its frames that
    end a transaction (a frame header's second word is the database size after a commit, 0
    otherwise). Each is one fsync with synchronous=FULL."""
    data = path.with_name(path.name + "-wal").read_bytes()
    if len(data) < 32:
        return 0
    page_size, salt = int.from_bytes(data[8:12], "big"), data[16:24]
    commits, offset = 0, 32
    while offset + 24 + page_size <= len(data):
        header = data[offset : offset + 24]
        if header[8:16] != salt:  # left over from before the log was reset
            break
        commits += int.from_bytes(header[4:8], "big") != 0
        offset += 24 + page_size
    return commits


async def open_thread(path: Path, schema: str = BATCH_SCHEMA, **options: Any) -> SQLiteThread:
    db = SQLiteThread(path, schema, StorageUnavailable, **options)
    await db.open()
    return db


async def plain_insert(db: SQLiteThread, n: int, name: str) -> int:
    """Plain grouped work: one row of ``item``."""
    rowcount: int = await db.grouped(
        lambda c: c.execute("INSERT INTO item VALUES (?, ?)", (n, name)).rowcount
    )
    return rowcount


async def inserts_traced(db: SQLiteThread) -> list[str]:
    """Every INSERT statement the thread's connection runs from now on."""
    statements: list[str] = []

    def keep(sql: str) -> None:
        if sql.lstrip().upper().startswith("INSERT"):
            statements.append(sql)

    await db.run(lambda conn: conn.set_trace_callback(keep))
    return statements


def test_batched_pieces_waiting_together_are_one_call_one_statement_one_commit(
    tmp_path: Path,
) -> None:
    """N grouped_batch calls made together: the batch function is called once, with all N
    pieces in order; one INSERT, one transaction committed (one fsync); the counters show one
    group of N; each caller gets its own result."""
    path = tmp_path / "t.db"
    inserts = Inserts()

    async def main() -> tuple[list[Any], int, int, int, int]:
        db = await open_thread(path)
        try:
            statements = await inserts_traced(db)
            groups, pieces, commits = db.groups, db.grouped_pieces, wal_commits(path)
            results = await asyncio.gather(
                *(db.grouped_batch((n, f"n{n}"), inserts) for n in range(40))
            )
            return (
                list(results),
                db.groups - groups,
                db.grouped_pieces - pieces,
                wal_commits(path) - commits,
                len(statements),
            )
        finally:
            await db.close()

    results, groups, pieces, commits, inserts_run = run(main())
    assert results == list(range(40))
    assert inserts.calls == [[(n, f"n{n}") for n in range(40)]]
    assert (groups, pieces) == (1, 40)
    assert commits == 1
    assert inserts_run == 1
    assert stored_items(path) == {n: f"n{n}" for n in range(40)}


def test_a_failing_batched_piece_fails_alone_and_the_others_are_committed(
    tmp_path: Path,
) -> None:
    """The one multi-row INSERT fails (a CHECK and a NOT NULL constraint): each piece is done
    again alone, so only the bad pieces fail, with the thread's error type, and the good ones
    are committed and readable from another connection."""
    path = tmp_path / "t.db"
    inserts = Inserts()
    pieces: list[Piece] = [(n, f"n{n}") for n in range(8)]
    pieces[3] = (3, "bad")  # CHECK (name <> 'bad')
    pieces[6] = (6, None)  # NOT NULL

    async def main() -> list[Any]:
        db = await open_thread(path)
        try:
            outcomes = await asyncio.gather(
                *(db.grouped_batch(piece, inserts) for piece in pieces), return_exceptions=True
            )
            return list(outcomes)
        finally:
            await db.close()

    outcomes = run(main())
    for n, outcome in enumerate(outcomes):
        if n in (3, 6):
            assert isinstance(outcome, StorageUnavailable), outcome
            assert isinstance(outcome.__cause__, sqlite3.IntegrityError)
        else:
            assert outcome == n
    assert "CHECK constraint failed" in str(outcomes[3])
    assert "NOT NULL constraint failed" in str(outcomes[6])
    assert stored_items(path) == {n: f"n{n}" for n in range(8) if n not in (3, 6)}
    # Once all together, then each piece again alone.
    assert inserts.calls == [pieces] + [[piece] for piece in pieces]
    assert write_lock_is_free(path)


def test_a_failing_batch_alone_in_its_group(tmp_path: Path) -> None:
    """A group of one batched piece that cannot be stored: it fails, nothing is committed, no
    transaction is left holding the write lock, and the thread serves on."""
    path = tmp_path / "t.db"
    inserts = Inserts()

    async def main() -> tuple[Any, int, bool, Any]:
        db = await open_thread(path)
        try:
            commits = wal_commits(path)
            try:
                outcome: Any = await db.grouped_batch((1, "bad"), inserts)
            except StorageUnavailable as exc:
                outcome = exc
            committed = wal_commits(path) - commits
            free = write_lock_is_free(path)
            after = await db.grouped_batch((2, "good"), inserts)
            return outcome, committed, free, after
        finally:
            await db.close()

    outcome, committed, free, after = run(main())
    assert isinstance(outcome, StorageUnavailable)
    assert isinstance(outcome.__cause__, sqlite3.IntegrityError)
    assert "CHECK constraint failed" in str(outcome)
    assert committed == 0
    assert free
    assert after == 2
    assert stored_items(path) == {2: "good"}


def test_batched_grouped_and_run_work_in_one_turn(tmp_path: Path) -> None:
    """grouped_batch calls of two batch functions, plain grouped work and run work, all made in
    one turn of the loop: every caller gets its own answer, each batch function is called once
    with its own pieces, and all of it is committed."""
    path = tmp_path / "t.db"
    evens, odds = Inserts(), Inserts()

    async def main() -> tuple[list[Any], int]:
        db = await open_thread(path)
        try:
            await db.run(lambda c: c.execute("INSERT INTO item VALUES (99, 'before')"))
            pieces = db.grouped_pieces
            results = await asyncio.gather(
                db.run(lambda c: c.execute("SELECT name FROM item WHERE id = 99").fetchone()[0]),
                plain_insert(db, 100, "plain"),
                *(db.grouped_batch((n, f"n{n}"), odds if n % 2 else evens) for n in range(10)),
                plain_insert(db, 101, "plain"),
                db.transaction(lambda c: c.execute("INSERT INTO item VALUES (102, 't')").rowcount),
            )
            return list(results), db.grouped_pieces - pieces
        finally:
            await db.close()

    results, pieces = run(main())
    assert results == ["before", 1, *range(10), 1, 1]
    assert evens.calls == [[(n, f"n{n}") for n in range(0, 10, 2)]]
    assert odds.calls == [[(n, f"n{n}") for n in range(1, 10, 2)]]
    assert pieces == 12  # 2 plain grouped pieces, 10 batched ones
    assert stored_items(path) == {
        99: "before",
        100: "plain",
        101: "plain",
        102: "t",
        **{n: f"n{n}" for n in range(10)},
    }


def test_a_failing_batched_piece_among_other_grouped_work(tmp_path: Path) -> None:
    """A batched piece fails while plain grouped work waits with it: the plain work before and
    after it is kept, and so are the other batched pieces."""
    path = tmp_path / "t.db"
    inserts = Inserts()

    async def main() -> list[Any]:
        db = await open_thread(path)
        try:
            outcomes = await asyncio.gather(
                plain_insert(db, 10, "x"),
                db.grouped_batch((1, "a"), inserts),
                db.grouped_batch((2, "bad"), inserts),
                db.grouped_batch((3, "c"), inserts),
                plain_insert(db, 11, "y"),
                return_exceptions=True,
            )
            return list(outcomes)
        finally:
            await db.close()

    outcomes = run(main())
    assert outcomes[:2] == [1, 1] and outcomes[3:] == [3, 1]
    assert isinstance(outcomes[2], StorageUnavailable)
    assert isinstance(outcomes[2].__cause__, sqlite3.IntegrityError)
    assert stored_items(path) == {10: "x", 1: "a", 3: "c", 11: "y"}
    assert inserts.calls == [[(1, "a"), (2, "bad"), (3, "c")], [(1, "a")], [(2, "bad")], [(3, "c")]]
    assert write_lock_is_free(path)


def test_batched_pieces_are_answered_only_once_committed(tmp_path: Path) -> None:
    """Whenever a grouped_batch call returns, its row is committed: another connection sees it.
    A slow piece of plain grouped work waits with the batched ones, so an answer given before
    the commit of the transaction holding the batch would find its row not yet visible."""
    path = tmp_path / "t.db"
    inserts = Inserts()

    def slow(conn: sqlite3.Connection) -> int:
        time.sleep(0.3)
        conn.execute("INSERT INTO item VALUES (100, 'slow')")
        return 100

    async def main() -> list[tuple[int, bool]]:
        db = await open_thread(path)
        seen: list[tuple[int, bool]] = []
        try:
            tasks = [asyncio.create_task(db.grouped_batch((n, f"n{n}"), inserts)) for n in range(5)]
            tasks.append(asyncio.create_task(db.grouped(slow)))
            for next_done in asyncio.as_completed(tasks):
                piece_id = await next_done
                seen.append((piece_id, piece_id in stored_items(path)))
        finally:
            await db.close()
        return seen

    seen = run(main())
    assert sorted(piece_id for piece_id, _ in seen) == [0, 1, 2, 3, 4, 100]
    assert all(visible for _, visible in seen), seen
    assert len(inserts.calls) == 1


def test_a_batch_refused_at_commit_is_never_half_answered(tmp_path: Path) -> None:
    """A deferred foreign key is checked at commit, after the batch call succeeded: the piece
    that breaks it fails; every piece answered with success is stored and every piece that
    failed is not; the thread serves on."""
    path = tmp_path / "t.db"
    calls: list[list[tuple[int, int | None]]] = []

    def children(conn: sqlite3.Connection, pieces: list[tuple[int, int | None]]) -> list[int]:
        calls.append(list(pieces))
        insert_rows(conn, "child", pieces)
        return [piece_id for piece_id, _ in pieces]

    async def main() -> tuple[list[Any], set[int], Any]:
        db = await open_thread(path, DEFERRED_SCHEMA)
        try:
            outcomes = await asyncio.gather(
                db.grouped_batch((1, None), children),
                db.grouped_batch((2, 99), children),  # no parent 99: refused at commit
                db.grouped_batch((3, None), children),
                return_exceptions=True,
            )
            ids = await db.run(lambda c: {r[0] for r in c.execute("SELECT id FROM child")})
            after = await db.grouped_batch((4, None), children)
            return list(outcomes), ids, after
        finally:
            await db.close()

    outcomes, stored, after = run(main())
    assert calls[0] == [(1, None), (2, 99), (3, None)]
    assert 2 not in stored
    assert "FOREIGN KEY constraint failed" in str(outcomes[1])
    # No success for a piece that is not stored, no failure for one that is.
    for n, outcome in enumerate(outcomes, start=1):
        if n in stored:
            assert outcome == n
        else:
            assert isinstance(outcome, StorageUnavailable), outcome
    assert after == 4


def test_batched_pieces_beyond_max_group_are_all_written_once(tmp_path: Path) -> None:
    """More batched pieces than a group holds: every piece is written by exactly one call of the
    batch function, and answered."""
    path = tmp_path / "t.db"
    inserts = Inserts()

    async def main() -> list[Any]:
        db = await open_thread(path, max_group=4)
        try:
            return list(
                await asyncio.gather(*(db.grouped_batch((n, f"n{n}"), inserts) for n in range(10)))
            )
        finally:
            await db.close()

    assert run(main()) == list(range(10))
    assert sorted(piece for call in inserts.calls for piece in call) == [
        (n, f"n{n}") for n in range(10)
    ]
    assert stored_items(path) == {n: f"n{n}" for n in range(10)}
