"""One SQLite connection served by one dedicated thread, for async callers.

Both embedded stores (events and status) use it, so the event loop never blocks on disk and the
connection is only ever touched by its own thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from gateway.errors import GatewayError

T = TypeVar("T")


class SQLiteThread:
    def __init__(
        self,
        path: Path,
        schema: str,
        error: type[GatewayError],
        synchronous: str = "FULL",
        busy_timeout_ms: int = 5000,
    ) -> None:
        self.path = path
        self.schema = schema
        self.error = error
        self.synchronous = synchronous
        self.busy_timeout_ms = busy_timeout_ms
        self._conn: sqlite3.Connection | None = None
        self._pool: ThreadPoolExecutor | None = None

    async def open(self) -> None:
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"sqlite-{self.path.name}"
        )
        await self.run(lambda conn: None)

    async def close(self) -> None:
        if self._pool is None:
            return
        await asyncio.get_running_loop().run_in_executor(self._pool, self._close_conn)
        self._pool.shutdown(wait=True)
        self._pool = None

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.executescript(self.schema)
            self._conn = conn
        return self._conn

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work(connection)`` on the thread; SQLite errors become ``self.error``."""
        if self._pool is None:
            raise self.error(f"{self.path.name} is not open")

        def call() -> T:
            try:
                return work(self._connect())
            except (sqlite3.Error, OSError) as exc:  # OSError: the folder cannot be made
                raise self.error(f"{self.path.name}: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` inside BEGIN IMMEDIATE … COMMIT, rolled back on any error."""

        def wrapped(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = work(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return out

        return await self.run(wrapped)

    async def ping(self) -> None:
        await self.run(lambda conn: conn.execute("SELECT 1").fetchone())
