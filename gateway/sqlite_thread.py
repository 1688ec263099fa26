"""One SQLite connection served by one dedicated thread, for async callers; with group commit.

Every embedded store (events, status, …) uses it, so the event loop never blocks on disk and the
connection is only ever touched by its own thread.

Callers hand the thread work (a function of the connection) through a queue. The thread takes
everything that is waiting at once and answers it with one wake-up of the event loop, not one
per call. Four kinds of work:

- :meth:`SQLiteThread.run`: run as it is (autocommit: a write is its own transaction).
- :meth:`SQLiteThread.transaction`: inside its own ``BEGIN IMMEDIATE … COMMIT``.
- :meth:`SQLiteThread.grouped`: group commit. All grouped work waiting together (up to
  ``max_group``) runs in one ``BEGIN IMMEDIATE … COMMIT``, so one fsync makes all of it
  durable, each piece inside its own ``SAVEPOINT`` (or none, for a piece that writes with one
  statement, which SQLite undoes by itself when it fails): a piece that fails is rolled back to
  its savepoint and fails alone, the others go on. No caller hears back before the COMMIT
  succeeded; if the COMMIT fails, every piece of the group fails (none of it is stored).
- :meth:`SQLiteThread.grouped_batch`: group commit for work given as data (a *piece*) and a
  function that writes many pieces at once, atomically (one statement in autocommit mode, or
  its own transaction), and raises only having written nothing. All pieces waiting together
  with the same function are written by one call of it: one statement, one lock, one fsync. If
  that call fails, each piece is written alone, so a bad piece fails alone. Every call of the
  sqlite3 module lets go of the interpreter lock and must win it back from the busy event loop,
  so one statement per group instead of several per piece is what keeps this thread from
  lagging behind under load.

``group_window_s`` > 0 makes the thread wait that long for more grouped work to join a group
that is not full; 0 (the default) groups what arrived while the previous commit was syncing,
which is already many pieces under load and adds no wait when there is no load.

Work taken together is in flight at the same time (no caller has had its answer), so any order
is a valid one: the thread runs the plain work first, in order, answers it at once, then the
batches, then the group. A piece of grouped work sees the pieces before it in its group, so two
stores of the same dedupe key in one group find each other, exactly as in two transactions one
after the other (a batch function must see to the same among its pieces).
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from gateway.errors import GatewayError

T = TypeVar("T")

Kind = Literal["run", "transaction", "grouped", "batch"]

#: Most grouped pieces committed in one transaction.
MAX_GROUP = 256


#: Handles several pieces of grouped work at once: one result per piece, in order.
BatchWork = Callable[[sqlite3.Connection, list[Any]], list[Any]]


class _Item:
    __slots__ = ("answered", "batch", "future", "kind", "loop", "one_statement", "piece", "work")

    def __init__(
        self,
        work: Callable[[sqlite3.Connection], Any],
        kind: Kind,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        one_statement: bool = False,
        batch: BatchWork | None = None,
        piece: Any = None,
    ) -> None:
        self.work = work
        self.kind = kind
        self.loop = loop
        self.future = future
        self.one_statement = one_statement
        self.batch = batch  # set for grouped_batch: work is batch(conn, [piece])[0]
        self.piece = piece
        self.answered = False


_STOP = object()

#: What one piece of work came to: (item, result, exception).
_Outcome = tuple[_Item, Any, BaseException | None]


class SQLiteThread:
    def __init__(
        self,
        path: Path,
        schema: str,
        error: type[GatewayError],
        synchronous: str = "FULL",
        busy_timeout_ms: int = 5000,
        group_window_s: float = 0.0,
        max_group: int = MAX_GROUP,
    ) -> None:
        self.path = path
        self.schema = schema
        self.error = error
        self.synchronous = synchronous
        self.busy_timeout_ms = busy_timeout_ms
        self.group_window_s = group_window_s
        self.max_group = max_group
        self._conn: sqlite3.Connection | None = None
        self._queue: queue.SimpleQueue[list[_Item] | object] = queue.SimpleQueue()
        self._outgoing: dict[asyncio.AbstractEventLoop, list[_Item]] = {}
        self._thread: threading.Thread | None = None
        #: Sizes of the groups committed so far, for tests and the benchmark: (groups, pieces).
        self.groups = 0
        self.grouped_pieces = 0

    # -- life cycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        if self._thread is None:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(
                target=self._serve, name=f"sqlite-{self.path.name}", daemon=True
            )
            self._thread.start()
        await self.run(lambda conn: None)

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        for loop in list(self._outgoing):  # work submitted just before: served before stopping
            self._hand_over(loop)
        self._queue.put(_STOP)
        await asyncio.get_running_loop().run_in_executor(None, thread.join)

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
                self._set_wal(conn)
                conn.execute(f"PRAGMA synchronous = {self.synchronous}")
                conn.executescript(self.schema)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _set_wal(self, conn: sqlite3.Connection) -> None:
        """Turn on WAL, waiting up to the busy timeout for other connections as any statement
        does. SQLite answers "database is locked" here at once, without its busy handler, while
        another process is creating the same new database (gateway workers starting together),
        so the wait is done here."""
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                    raise
                if time.monotonic() >= deadline:
                    raise
            time.sleep(0.01)

    # -- for async callers ---------------------------------------------------------------------

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work(connection)`` on the thread; SQLite errors become ``self.error``."""
        return await self._submit(work, "run")

    async def transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` inside BEGIN IMMEDIATE … COMMIT, rolled back on any error."""
        return await self._submit(work, "transaction")

    async def grouped(
        self, work: Callable[[sqlite3.Connection], T], one_statement: bool = False
    ) -> T:
        """Run ``work`` in a transaction it may share with other grouped work (its own
        savepoint): answered once that transaction is committed. See the module's docstring.

        ``one_statement``: ``work`` changes the database with one statement at most (reads
        aside), which SQLite undoes by itself when it fails, so no savepoint is needed."""
        return await self._submit(work, "grouped", one_statement)

    async def grouped_batch(self, piece: Any, batch: BatchWork) -> Any:
        """Like :meth:`grouped` for ``batch(connection, [piece])[0]``, except that the pieces
        waiting together with the same ``batch`` are handled by one call of it (see the
        module's docstring). ``batch`` must change the database with one statement at most
        per call, or leave it unchanged when it raises."""

        def alone(conn: sqlite3.Connection) -> Any:
            return batch(conn, [piece])[0]

        return await self._submit(alone, "batch", False, batch, piece)

    async def ping(self) -> None:
        await self.run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def _submit(
        self,
        work: Callable[[sqlite3.Connection], T],
        kind: Kind,
        one_statement: bool = False,
        batch: BatchWork | None = None,
        piece: Any = None,
    ) -> T:
        if self._thread is None:
            raise self.error(f"{self.path.name} is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        # Handed over once per turn of the event loop, all together: waking the thread costs
        # far more than the call itself on a busy machine, so it is woken once, not per call.
        pending = self._outgoing.get(loop)
        if pending is None:
            pending = self._outgoing[loop] = []
            loop.call_soon(self._hand_over, loop)
        pending.append(_Item(work, kind, loop, future, one_statement, batch, piece))
        return await future

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        items = self._outgoing.pop(loop, None)
        if items:
            self._queue.put(items)

    # -- on the thread -------------------------------------------------------------------------

    def _serve(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while True:  # everything waiting now
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch:
                stopping = True
                batch = batch[: batch.index(_STOP)]  # nobody submits after close()
            items = [item for handed in batch if isinstance(handed, list) for item in handed]
            try:
                self._work(items)
            except BaseException as exc:  # a bug here must not leave callers waiting for ever
                self._close_conn()  # start again from a fresh connection
                unanswered = [item for item in items if not item.answered]
                _deliver([(item, None, self._failure(exc)) for item in unanswered])
        self._close_conn()
        while True:  # handed over after the close request: refused, never left waiting
            try:
                handed = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(handed, list):
                closed = self.error(f"{self.path.name} is not open")
                _deliver([(item, None, closed) for item in handed])

    def _work(self, items: list[_Item]) -> None:
        plain = [item for item in items if item.kind in ("run", "transaction")]
        group = [item for item in items if item.kind == "grouped"]
        batched = [item for item in items if item.kind == "batch"]
        if plain:
            _deliver([self._one(item) for item in plain])
        if batched:
            _deliver(self._batches(batched))
        while group:
            if self.group_window_s > 0 and len(group) < self.max_group:
                more = self._wait_for_more(len(group))
                items += more
                group += [item for item in more if item.kind == "grouped"]
                other = [item for item in more if item.kind != "grouped"]
                if other:  # work of another kind arrived meanwhile: answer it first
                    _deliver([self._one(item) for item in other])
            head, group = group[: self.max_group], group[self.max_group :]
            _deliver(self._group(head))

    def _wait_for_more(self, have: int) -> list[_Item]:
        """Work arriving within the group window; a close request is put back for later."""
        more: list[_Item] = []
        deadline = time.monotonic() + self.group_window_s
        while have + len(more) < self.max_group:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                handed = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if not isinstance(handed, list):  # the close request: after this group
                self._queue.put(handed)
                break
            more += handed
        return more

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _failure(self, exc: BaseException) -> BaseException:
        if isinstance(exc, sqlite3.Error | OSError):  # OSError: the folder cannot be made
            error = self.error(f"{self.path.name}: {exc}")
            error.__cause__ = exc
            return error
        return exc

    def _one(self, item: _Item) -> _Outcome:
        try:
            conn = self._connect()
            if item.kind in ("run", "batch"):  # a batch function makes its own transaction
                return item, item.work(conn), None
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = item.work(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return item, out, None
        except Exception as exc:
            return item, None, self._failure(exc)

    def _group(self, group: list[_Item]) -> list[_Outcome]:
        """One transaction for the whole group, a savepoint for each piece."""
        done: list[_Outcome] = []  # pieces that succeeded, not yet committed
        failed: list[_Outcome] = []
        conn: sqlite3.Connection | None = None
        for index, item in enumerate(group):
            try:
                if conn is None or not conn.in_transaction:
                    # The first piece, or SQLite rolled the transaction back itself.
                    conn = self._connect()
                    conn.execute("BEGIN IMMEDIATE")
            except Exception as exc:
                return failed + [(i, None, self._failure(exc)) for i in group[index:]]
            savepoint = not item.one_statement
            try:
                if savepoint:
                    conn.execute("SAVEPOINT piece")
                out = item.work(conn)
                if savepoint:
                    conn.execute("RELEASE piece")
            except Exception as exc:
                failed.append((item, None, self._failure(exc)))
                if conn.in_transaction and savepoint:
                    try:
                        conn.execute("ROLLBACK TO piece")
                        conn.execute("RELEASE piece")
                    except Exception:
                        conn.execute("ROLLBACK")
                if not conn.in_transaction:  # the earlier pieces are undone as well
                    failed += [(i, None, self._failure(exc)) for i, _, _ in done]
                    done = []
                continue
            done.append((item, out, None))
        if not done:
            if conn is not None and conn.in_transaction:
                conn.execute("ROLLBACK")
            return failed
        assert conn is not None  # done is empty otherwise
        try:
            conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return failed + [(item, None, self._failure(exc)) for item, _, _ in done]
        self.groups += 1
        self.grouped_pieces += len(done)
        return failed + done

    def _batches(self, items: list[_Item]) -> list[_Outcome]:
        """Batched pieces: those sharing a batch function in one call of it, in autocommit mode
        (the call is its own transaction: one statement, so one lock and one fsync for all of
        them). If that call fails, each piece is tried alone, so a bad piece fails alone."""
        by_batch: dict[BatchWork, list[_Item]] = {}
        for item in items:
            assert item.batch is not None
            by_batch.setdefault(item.batch, []).append(item)
        outcomes: list[_Outcome] = []
        for batch, pieces in by_batch.items():
            try:
                conn = self._connect()
                results = batch(conn, [item.piece for item in pieces])
                if len(results) != len(pieces):
                    raise RuntimeError("a batch function must return one result per piece")
            except Exception:
                outcomes += [self._one(item) for item in pieces]
                continue
            self.groups += 1
            self.grouped_pieces += len(pieces)
            outcomes += [(item, result, None) for item, result in zip(pieces, results, strict=True)]
        return outcomes


def _deliver(outcomes: list[_Outcome]) -> None:
    """Answer each piece on its own event loop: one wake-up per loop for all of them."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
    for outcome in outcomes:
        outcome[0].answered = True
        by_loop.setdefault(outcome[0].loop, []).append(outcome)
    for loop, some in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, some)
        except RuntimeError:  # that loop is closed: nobody is waiting any more
            pass


def _settle(outcomes: list[_Outcome]) -> None:
    for item, result, exc in outcomes:
        if item.future.cancelled():
            continue
        if exc is not None:
            item.future.set_exception(exc)
        else:
            item.future.set_result(result)
