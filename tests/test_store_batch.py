"""store() calls of one group written together: on SQLite one multi-row ``INSERT … ON CONFLICT
(partner, dedupe_key) DO NOTHING`` for all the events of all the calls of a group
(gateway/storage/sqlite.py, ``_store_rows``), in statements of INSERT_ROWS rows at most. Through
the storage API, on both backends where the contract is the same; real SQLite files and
PostgreSQL databases.

"Together" is made certain, not left to timing: calls started in the same turn of the event loop
form one group.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import StorageUnavailable
from gateway.sqlite_thread import SQLiteThread
from gateway.storage import Storage, StoreResult
from gateway.storage.sqlite import INSERT_ROWS
from tests.test_group_commit import committed_ids
from tests.test_storage import event, opened, url

__all__ = ["url"]  # the fixture: an empty store of each backend


class Watch:
    """What the SQLite storage's thread does from now on: groups committed, and the INSERT
    statements into ``events`` its connection runs. Nothing for PostgreSQL."""

    def __init__(self) -> None:
        self.thread: SQLiteThread | None = None
        self.groups_before = 0
        self.inserts: list[str] = []

    @classmethod
    async def start(cls, storage: Storage) -> Watch:
        watch = cls()
        thread = getattr(storage, "_db", None)
        if isinstance(thread, SQLiteThread):
            watch.thread = thread
            watch.groups_before = thread.groups

            def keep(sql: str) -> None:
                if sql.lstrip().startswith("INSERT INTO events"):
                    watch.inserts.append(sql[:40])

            await thread.run(lambda conn: conn.set_trace_callback(keep))
        return watch

    @property
    def groups(self) -> int:
        assert self.thread is not None
        return self.thread.groups - self.groups_before


def test_a_group_with_duplicates_of_each_other_and_of_stored_events(url: str) -> None:
    """Many store calls in one group, some repeating each other's dedupe keys (across calls and
    within a call) and some repeating events stored before: exactly one event per (partner,
    dedupe_key) is stored, the first one; every duplicate is answered with the event_id of the
    stored event and ``stored`` false. SQLite: one group, one INSERT for all of it."""

    async def main() -> tuple[list[list[StoreResult]], set[str], int, Watch]:
        async with opened(url) as storage:
            await storage.store([event(f"old{n}", event_id=f"old-{n}") for n in range(5)])
            watch = await Watch.start(storage)
            calls = [
                [event(f"new{n % 8}", event_id=f"c{n}-new"), event(f"old{n % 5}", event_id=f"c{n}")]
                for n in range(20)
            ]
            calls.append(
                [event("x", event_id="x1"), event("y", event_id="y1"), event("x", event_id="x2")]
            )
            calls.append([event("new0", partner="appsflyer", event_id="af-new0")])
            results = await asyncio.gather(*(storage.store(call) for call in calls))
            stored = {e.event_id for e in await storage.events(limit=1000)}
            return list(results), stored, await storage.count(), watch

    results, stored, count, watch = asyncio.run(main())
    for n in range(20):
        first = n % 8  # the call that stored new{n % 8}: the first to send it
        assert results[n] == [
            StoreResult(stored=n == first, event_id=f"c{first}-new"),
            StoreResult(stored=False, event_id=f"old-{n % 5}"),
        ]
    assert results[20] == [
        StoreResult(stored=True, event_id="x1"),
        StoreResult(stored=True, event_id="y1"),
        StoreResult(stored=False, event_id="x1"),
    ]
    assert results[21] == [StoreResult(stored=True, event_id="af-new0")]
    expected = {f"old-{n}" for n in range(5)} | {f"c{n}-new" for n in range(8)}
    expected |= {"x1", "y1", "af-new0"}
    assert stored == expected
    assert count == len(expected)
    assert committed_ids(url) == expected
    if watch.thread is not None:
        assert watch.groups == 1
        assert len(watch.inserts) == 1  # one multi-row statement for the 22 calls


def test_every_answer_carries_the_stored_event_id(url: str) -> None:
    """Fifty calls of ten events each, every key sent by five calls, half of the keys stored
    before: whatever the order, the answers for a key all name one event, the one stored, and
    exactly one answer per new key says stored."""
    keys = [f"k{n}" for n in range(100)]

    async def main() -> tuple[list[list[StoreResult]], dict[str, str]]:
        async with opened(url) as storage:
            await storage.store([event(k, event_id=f"pre-{k}") for k in keys[::2]])
            calls = [
                [event(keys[(c * 7 + i * 10) % 100], event_id=f"c{c}-{i}") for i in range(10)]
                for c in range(50)
            ]
            results = await asyncio.gather(*(storage.store(call) for call in calls))
            found = await storage.find("kochava", keys)
            return list(results), {k: e.event_id for k, e in found.items()}

    results, stored_by_key = asyncio.run(main())
    assert len(stored_by_key) == 100
    answers: dict[str, list[StoreResult]] = {}
    for c, call_results in enumerate(results):
        for i, result in enumerate(call_results):
            key = keys[(c * 7 + i * 10) % 100]
            answers.setdefault(key, []).append(result)
            assert result.stored == (result.event_id == f"c{c}-{i}")
    for key, got in answers.items():
        assert {r.event_id for r in got} == {stored_by_key[key]}, key
        assert sum(r.stored for r in got) == (0 if int(key[1:]) % 2 == 0 else 1), key
    assert all(stored_by_key[k] == f"pre-{k}" for k in keys[::2])


def test_storing_the_same_event_again_stores_it_once(url: str) -> None:
    """The very same event (same event_id) stored again by a later call is not stored twice,
    and the answer names it. (Event ids are new for every mapped event, so this does not happen
    on the postback path; the protocol leaves ``stored`` unspecified for a reused id.)"""

    async def work(storage: Storage) -> tuple[list[StoreResult], list[StoreResult], int]:
        same = event("k1", event_id="e1")
        first = await storage.store([same])
        again = await storage.store([same, event("k2", event_id="e2")])
        return first, again, await storage.count()

    async def main() -> tuple[list[StoreResult], list[StoreResult], int]:
        async with opened(url) as storage:
            return await work(storage)

    first, again, count = asyncio.run(main())
    assert first == [StoreResult(stored=True, event_id="e1")]
    assert again[0].event_id == "e1"
    assert again[1] == StoreResult(stored=True, event_id="e2")
    assert count == 2


def test_more_than_insert_rows_events_in_one_group_are_all_stored(url: str) -> None:
    """A call of more than twice INSERT_ROWS events and a small call with it, with duplicates
    across the statements the rows are cut into: all stored but the duplicates, each answered
    with the event stored first, committed when the calls return. SQLite: one group, in
    ceil(rows / INSERT_ROWS) INSERT statements."""
    size = 2 * INSERT_ROWS + 123
    dup_first = INSERT_ROWS + 5  # second statement, duplicate of the first event
    dup_second = 2 * INSERT_ROWS + 1  # third statement, duplicate of one in the second

    def key(i: int) -> str:
        return {dup_first: "k0", dup_second: f"k{INSERT_ROWS + 7}"}.get(i, f"k{i}")

    async def main() -> tuple[list[StoreResult], list[StoreResult], set[str], Watch]:
        async with opened(url) as storage:
            watch = await Watch.start(storage)
            big, small = await asyncio.gather(
                storage.store([event(key(i), event_id=f"e{i}") for i in range(size)]),
                storage.store([event("k1", event_id="other"), event("solo", event_id="solo")]),
            )
            return big, small, committed_ids(url), watch

    big, small, committed, watch = asyncio.run(main())
    assert len(big) == size
    for i, result in enumerate(big):
        if i == dup_first:
            assert result == StoreResult(stored=False, event_id="e0")
        elif i == dup_second:
            assert result == StoreResult(stored=False, event_id=f"e{INSERT_ROWS + 7}")
        else:
            assert result == StoreResult(stored=True, event_id=f"e{i}"), i
    assert small == [
        StoreResult(stored=False, event_id="e1"),
        StoreResult(stored=True, event_id="solo"),
    ]
    assert committed == {f"e{i}" for i in range(size) if i not in (dup_first, dup_second)} | {
        "solo"
    }
    if watch.thread is not None:
        assert watch.groups == 1
        assert len(watch.inserts) == math.ceil((size + 2) / INSERT_ROWS) == 3


@pytest.mark.parametrize("size", [INSERT_ROWS, INSERT_ROWS + 1])
def test_insert_rows_boundary(tmp_path: Path, size: int) -> None:
    """Exactly INSERT_ROWS rows take one statement; one more takes two; all are stored."""
    sqlite_url = f"sqlite:///{tmp_path}/data/gateway.db"

    async def main() -> tuple[list[StoreResult], int, Watch]:
        async with opened(sqlite_url) as storage:
            watch = await Watch.start(storage)
            results = await storage.store([event(f"k{i}", event_id=f"e{i}") for i in range(size)])
            return results, await storage.count(), watch

    results, count, watch = asyncio.run(main())
    assert results == [StoreResult(stored=True, event_id=f"e{i}") for i in range(size)]
    assert count == size
    assert len(watch.inserts) == (1 if size == INSERT_ROWS else 2)


def test_a_failing_call_of_more_than_insert_rows_events_stores_nothing(url: str) -> None:
    """A call of more than INSERT_ROWS events whose last event cannot be stored (its event_id
    is taken), in a group with good calls: the call fails as a whole, none of its events is
    stored (not even those of its first INSERT statement), and the good calls are stored."""
    size = INSERT_ROWS + 10

    async def main() -> tuple[list[Any], set[str]]:
        async with opened(url) as storage:
            await storage.store([event("first", event_id="taken")])
            bad = [event(f"k{i}", event_id=f"e{i}") for i in range(size - 1)]
            bad.append(event("last", event_id="taken"))
            outcomes = await asyncio.gather(
                storage.store([event("a", event_id="ea")]),
                storage.store(bad),
                storage.store([event("k5", event_id="eb")]),  # new: the bad call's k5 is not
                return_exceptions=True,
            )
            return list(outcomes), committed_ids(url)

    outcomes, committed = asyncio.run(main())
    assert outcomes[0] == [StoreResult(stored=True, event_id="ea")]
    assert isinstance(outcomes[1], StorageUnavailable)
    assert outcomes[2] == [StoreResult(stored=True, event_id="eb")]
    assert committed == {"taken", "ea", "eb"}
