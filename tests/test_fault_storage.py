"""Storage that cannot take an event (issue 6): a full disk, or a database that refuses
connections, is answered 503 with ``Retry-After`` (partners retry 5xx), never 2xx; nothing is
half stored; once space or the server is back, the partner's retries are accepted.

How each fault is made real, without mounting anything:

- SQLite, disk full: a real ``gateway serve`` process gets a file-size limit (RLIMIT_FSIZE, set
  from outside with prlimit(2)) just above the end of its write-ahead log. The kernel then
  refuses to grow its files, as a full disk does: SQLite's next write stops at the limit, and
  the rest fails with EFBIG where a full disk gives ENOSPC, so SQLite says "disk I/O error"
  (SQLITE_IOERR_WRITE) rather than "database or disk is full" (SQLITE_FULL); the gateway treats
  every SQLite error the same way. Raising the limit is space coming back. (``PRAGMA
  max_page_count`` cannot do it: it is a setting of the connection that runs it, so a second
  connection setting it leaves the gateway's connection unlimited.) While the disk is full even
  a retry of a stored event is answered 503 (the insert's AUTOINCREMENT bookkeeping needs a
  write); once space is back it is answered duplicate.
- PostgreSQL, disk full: PostgreSQL has no per-database quota, so a trigger added by a second
  connection raises SQLSTATE 53100 ``disk_full`` (what the server raises when it cannot extend a
  file) on any insert of a new event, as the server would; dropping it is space coming back.
- PostgreSQL unavailable: the database stops accepting connections (``ALLOW_CONNECTIONS false``,
  which binds superusers too) and the gateway's connections are terminated.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from litestar.testing import TestClient
from psycopg import sql

from gateway.app import create_app
from gateway.config import Config
from gateway.errors import StorageUnavailable
from gateway.publish.outbox import PostgresOutbox
from gateway.storage import open_storage
from gateway.storage.postgres import ACQUIRE_TIMEOUT_S, RECONNECT_TIMEOUT_S
from tests.faults import Serve, metric
from tests.fixtures import ADMIN_TOKEN, make_config, new_key
from tests.test_status import POSTBACK, sample
from tests.test_storage import POSTGRES_ADMIN_URL, event, postgres_database

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
INSTALL = "install_ios_attributed.json"


def install(transaction_id: str) -> bytes:
    return sample(INSTALL, transaction_id=transaction_id)


def assert_retry_later(response: httpx.Response) -> None:
    """What a partner must get while storage cannot take the event: 503, retry."""
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "30"
    assert response.json()["error"] == "storage_unavailable"


def stored_keys(url: str) -> list[str]:
    async def run() -> list[str]:
        storage = open_storage(url)
        await storage.open()
        try:
            return sorted(e.dedupe_key for e in await storage.scan(limit=10_000))
        finally:
            await storage.close()

    return asyncio.run(run())


# -- SQLite: the disk fills up under a running gateway -------------------------------------------


def test_sqlite_disk_full_answers_503_then_recovers(tmp_path: Path) -> None:
    gateway = Serve(tmp_path)
    gateway.start()
    try:
        key = gateway.create_key()
        url = gateway.base_url + POSTBACK
        with httpx.Client(timeout=30, params={"api_key": key}) as http:
            for n in range(3):
                assert http.post(url, content=install(f"before-{n}")).status_code == 202

            assert gateway.process is not None
            wal = tmp_path / "data" / "gateway.db-wal"
            # Room for a frame header, not for the page after it: the next write is cut short.
            limit = wal.stat().st_size + 1000
            hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
            resource.prlimit(gateway.process.pid, resource.RLIMIT_FSIZE, (limit, hard))

            for n in range(5):
                assert_retry_later(http.post(url, content=install(f"full-{n}")))
            assert stored_keys(f"sqlite:///{tmp_path}/data/gateway.db") == [
                "before-0",
                "before-1",
                "before-2",
            ]
            text = http.get(gateway.base_url + "/metrics").text
            assert metric(text, "gateway_storage_errors_total") == 5
            assert (
                metric(
                    text,
                    "gateway_postbacks_total",
                    partner="kochava",
                    outcome="storage_unavailable",
                )
                == 5
            )
            assert "gateway.db: disk I/O error" in gateway.log_text()  # the reason: log only

            # Space comes back: the partner's retries are accepted, once each.
            resource.prlimit(gateway.process.pid, resource.RLIMIT_FSIZE, (hard, hard))
            for n in range(5):
                response = http.post(url, content=install(f"full-{n}"))
                assert response.status_code == 202, response.text
            again = http.post(url, content=install("before-0"))
            assert (again.status_code, again.json()["status"]) == (200, "duplicate")
    finally:
        gateway.stop()
    assert stored_keys(f"sqlite:///{tmp_path}/data/gateway.db") == sorted(
        [f"before-{n}" for n in range(3)] + [f"full-{n}" for n in range(5)]
    )


# -- PostgreSQL ----------------------------------------------------------------------------------


@pytest.fixture
def pg_config(tmp_path: Path) -> Iterator[Config]:
    with postgres_database() as url:
        config = make_config(tmp_path / "data")
        config.storage.url = url
        yield config


def dbname(config: Config) -> str:
    return config.storage.url.rsplit("/", 1)[1]


@contextlib.contextmanager
def admin_connection(url: str = POSTGRES_ADMIN_URL) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        yield conn


@contextlib.contextmanager
def refusing_connections(name: str) -> Iterator[None]:
    """PostgreSQL unavailable for database ``name`` inside the block: it accepts no connection
    and those open are terminated."""
    allow = sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format
    try:
        with admin_connection() as other:
            other.execute(allow(sql.Identifier(name), sql.SQL("false")))
            other.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
        yield
    finally:
        with admin_connection() as other:
            other.execute(allow(sql.Identifier(name), sql.SQL("true")))


DISK_FULL = """
CREATE FUNCTION disk_is_full() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  -- A row that conflicts writes nothing (ON CONFLICT DO NOTHING), as on a real full disk.
  IF NOT EXISTS (SELECT 1 FROM events WHERE partner = NEW.partner
                 AND dedupe_key = NEW.dedupe_key) THEN
    RAISE EXCEPTION 'could not extend file "base/1/2": No space left on device'
      USING ERRCODE = 'disk_full';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER disk_is_full BEFORE INSERT ON events
  FOR EACH ROW EXECUTE FUNCTION disk_is_full();
"""


def test_postgres_disk_full_answers_503_then_recovers(
    pg_config: Config, admin: dict[str, str]
) -> None:
    key = new_key(pg_config)
    with TestClient(create_app(pg_config)) as client:
        params = {"api_key": key}
        assert client.post(POSTBACK, params=params, content=install("before")).status_code == 202

        with admin_connection(pg_config.storage.url) as other:
            other.execute(DISK_FULL)
        for n in range(3):
            assert_retry_later(client.post(POSTBACK, params=params, content=install(f"full-{n}")))
        again = client.post(POSTBACK, params=params, content=install("before"))
        assert (again.status_code, again.json()["status"]) == (200, "duplicate")
        assert stored_keys(pg_config.storage.url) == ["before"]

        with admin_connection(pg_config.storage.url) as other:
            other.execute("DROP TRIGGER disk_is_full ON events")
        for n in range(3):
            response = client.post(POSTBACK, params=params, content=install(f"full-{n}"))
            assert response.status_code == 202, response.text
        text = client.get("/metrics").text
    assert metric(text, "gateway_storage_errors_total") == 3
    assert stored_keys(pg_config.storage.url) == ["before", "full-0", "full-1", "full-2"]


#: Long enough for the pool's own backoff (1 s, 2 s, 4 s, …) to put its next try well over
#: ACQUIRE_TIMEOUT_S after PostgreSQL is back.
OUTAGE_S = 8.0


def test_postgres_refusing_connections_answers_503_then_recovers(pg_config: Config) -> None:
    """Requests that find the pool unable to connect wait for the storage's acquire timeout
    (ACQUIRE_TIMEOUT_S, 1.5 s) at most, then answer 503: in time for a partner that gives up
    after 2 s. Each wave is sent together, so the test waits once per wave. After an outage of
    OUTAGE_S, the first request once PostgreSQL is back is stored (RECONNECT_TIMEOUT_S)."""
    key = new_key(pg_config)
    name = dbname(pg_config)
    with TestClient(create_app(pg_config)) as client:
        params = {"api_key": key}
        assert client.post(POSTBACK, params=params, content=install("before")).status_code == 202
        with refusing_connections(name):
            outage_from = time.monotonic()

            async def during_outage() -> list[httpx.Response]:
                transport = httpx.ASGITransport(app=client.app)
                async with httpx.AsyncClient(
                    transport=transport, base_url="http://gateway", timeout=60
                ) as http:
                    return await asyncio.gather(
                        *(
                            http.post(POSTBACK, params=params, content=install(f"down-{n}"))
                            for n in range(3)
                        )
                    )

            for response in client.blocking_portal.call(during_outage):
                assert_retry_later(response)  # the pool's connection was cut: at once
            # Now the pool has no connection and cannot make one: the next requests wait for
            # one up to the acquire timeout, not longer.
            started = time.monotonic()
            for response in client.blocking_portal.call(during_outage):
                assert_retry_later(response)
            waited = time.monotonic() - started
            assert RECONNECT_TIMEOUT_S < ACQUIRE_TIMEOUT_S < 2, "a retry comes within a wait"
            assert ACQUIRE_TIMEOUT_S <= waited < 4, waited
            ready = client.get("/readyz")
            assert (ready.status_code, ready.json()["storage"]) == (503, "unavailable")
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage_from)))
        for n in range(3):
            response = client.post(POSTBACK, params=params, content=install(f"down-{n}"))
            assert response.status_code == 202, response.text
        assert client.get("/readyz").status_code == 200
    assert stored_keys(pg_config.storage.url) == ["before", "down-0", "down-1", "down-2"]


def test_postgres_outbox_publishes_again_as_soon_as_the_database_is_back(
    pg_config: Config,
) -> None:
    """The outbox's pool reconnects as the storage's does (RECONNECT_TIMEOUT_S): after an
    outage of OUTAGE_S, the publisher's first read once PostgreSQL is back gets the events
    waiting, instead of failing until the pool's backoff comes round to its next try."""
    url = pg_config.storage.url

    async def run() -> None:
        storage = open_storage(url)
        await storage.open()
        outbox = PostgresOutbox(url, timeout=ACQUIRE_TIMEOUT_S)
        await outbox.open()
        try:
            await storage.store([event("before")])
            assert len(await outbox.pending(10)) == 1
            with refusing_connections(dbname(pg_config)):
                outage_from = time.monotonic()
                for _ in range(2):  # the pool's connection was cut, then none can be made
                    with pytest.raises(StorageUnavailable, match="outbox"):
                        await outbox.pending(10)
                await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage_from)))
            started = time.monotonic()
            pending = await outbox.pending(10)
            assert time.monotonic() - started < ACQUIRE_TIMEOUT_S
            assert len(pending) == 1 and await outbox.count() == 1
        finally:
            await outbox.close()
            await storage.close()

    asyncio.run(run())
