"""Redis stopped mid-run (issue 6): postbacks are still accepted and stored, the gap shows in
``/readyz`` and in metrics, and status catches up when Redis is back: counters and
last_success_at end up equal to what was sent, and ``gateway_status_pending`` returns to 0.

Each test runs a redis-server of its own (tests/faults.py), so it can be stopped and started.
"""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.status import open_status
from gateway.status.buffer import RETRY_EVERY_S, BufferedStatus
from tests.faults import RedisServer, metric
from tests.fixtures import make_config, new_key
from tests.test_status import POSTBACK, SAMPLES, STATUS, counters, sample

INSTALL = "install_ios_attributed.json"
ORGANIC = "install_organic.json"

#: Bound on waiting for the retry loop (every RETRY_EVERY_S) to write what is pending once Redis
#: is back: many retries' worth, for a loaded CI machine. Not a timing target.
CATCH_UP_S = 20 * RETRY_EVERY_S


def scrape(client: TestClient[Any]) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200
    return response.text


def wait_for_no_pending(client: TestClient[Any]) -> None:
    started = time.monotonic()
    while metric(scrape(client), "gateway_status_pending") != 0:
        assert time.monotonic() - started < CATCH_UP_S, "status did not catch up"
        time.sleep(0.1)


def post(client: TestClient[Any], body: bytes, key: str) -> httpx.Response:
    # Real time, not freezegun: the retry loop's timer runs on the app's own event loop.
    return client.post(POSTBACK, params={"api_key": key}, content=body)


def install(transaction_id: str) -> bytes:
    return sample(INSTALL, transaction_id=transaction_id)


def test_status_catches_up_when_redis_returns(tmp_path: Path, admin: dict[str, str]) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        config = make_config(tmp_path / "data")
        config.status.redis_url = server.url
        key = new_key(config)
        with TestClient(create_app(config)) as client:
            # Redis up: one of each.
            assert post(client, install("up-1"), key).status_code == 202
            assert post(client, install("up-1"), key).json()["status"] == "duplicate"
            assert post(client, SAMPLES[ORGANIC], key).status_code == 200
            assert post(client, install("up-2"), "gwk_wrong").status_code == 401
            assert post(client, b"{not json", key).status_code == 400
            up = client.get(STATUS, headers=admin).json()
            assert up["counters"] == counters(
                accepted=1, duplicate=1, ignored_organic=1, unauthorized=1, rejected=1
            )
            assert metric(scrape(client), "gateway_status_pending") == 0

            server.stop()  # Redis goes away mid-run
            sent = [
                (install("down-1"), key, 202),
                (install("down-2"), key, 202),
                (install("down-3"), key, 202),
                (install("up-1"), key, 200),  # duplicate
                (SAMPLES[ORGANIC], key, 200),
                (install("down-4"), "gwk_wrong", 401),
                (sample(INSTALL, install_time="tomorrow"), key, 422),
            ]
            for body, with_key, code in sent:
                response = post(client, body, with_key)
                assert response.status_code == code, response.text
            events = client.get("/events", params={"limit": 100}, headers=admin).json()["events"]
            assert sorted(e["dedupe_key"] for e in events) == [
                "down-1",
                "down-2",
                "down-3",
                "up-1",
            ]
            latest = max(datetime.fromisoformat(e["received_at"]) for e in events)

            # The gap is visible: /readyz, the status endpoint, the errors and pending updates.
            ready = client.get("/readyz")
            assert (ready.status_code, ready.json()["status_store"]) == (503, "unavailable")
            assert client.get(STATUS, headers=admin).status_code == 503
            text = scrape(client)
            assert metric(text, "gateway_status_pending") == len(sent)
            # Failed writes are counted per write round (a round carries every update noted
            # since the last), plus the failed read.
            assert metric(text, "gateway_status_errors_total") >= 2

            server.start()  # same port, same append-only file
            wait_for_no_pending(client)
            errors = metric(scrape(client), "gateway_status_errors_total")
            back = client.get(STATUS, headers=admin).json()
            assert datetime.fromisoformat(back["last_success_at"]) == latest
            assert back["counters"] == counters(
                accepted=4, duplicate=2, ignored_organic=2, unauthorized=2, rejected=2
            )
            assert client.get("/readyz").status_code == 200
            # No new errors once Redis answered: the retry loop wrote what was pending.
            assert post(client, install("up-3"), key).status_code == 202
            client.get(STATUS, headers=admin)
            assert metric(scrape(client), "gateway_status_errors_total") == errors
    finally:
        server.stop()


def test_a_batch_whose_reply_was_lost_is_counted_once(tmp_path: Path) -> None:
    """Redis executes a status write but its answer never arrives: Redis is busy (DEBUG SLEEP)
    when the write is sent, the gateway gives up after its 2 s socket timeout and sends the same
    batch again later; when Redis wakes it runs both. Each batch carries the process's writer id
    and a sequence number, and Redis applies a (writer, seq) once: counted once, not twice."""
    server = RedisServer(tmp_path / "redis", "--enable-debug-command", "yes")
    server.start()
    t1 = datetime(2024, 6, 1, 12, tzinfo=UTC)
    t2 = datetime(2024, 6, 1, 13, tzinfo=UTC)

    async def run() -> tuple[int, int]:
        status = BufferedStatus(open_status(server.url, str(tmp_path), "lost:"))
        await status.open()
        try:
            await status.record("kochava", {"accepted": 1}, t1)
            calls_before = evalsha_calls()
            sleeper = threading.Thread(target=busy_redis, args=(3,))
            sleeper.start()
            await asyncio.sleep(0.3)  # the sleep has started
            with pytest.raises(Exception, match="Timeout"):
                await status.record("kochava", {"accepted": 1, "duplicate": 1}, t2)
            assert status.pending == 1
            deadline = time.monotonic() + CATCH_UP_S
            while status.pending:
                assert time.monotonic() < deadline, "status did not catch up"
                await asyncio.sleep(0.1)
            sleeper.join()
            return calls_before, evalsha_calls()
        finally:
            await status.close()

    def evalsha_calls() -> int:
        with server.client() as client:
            stats: dict[str, Any] = client.info("commandstats")
        return int(stats["cmdstat_evalsha"]["calls"])

    def busy_redis(seconds: int) -> None:
        with server.client() as client:
            client.execute_command("DEBUG", "SLEEP", str(seconds))

    try:
        before, after = asyncio.run(run())
        # The second batch reached Redis at least twice (the timed-out send ran when Redis
        # woke, then the re-send)...
        assert after - before >= 2
        with server.client() as client:
            values = client.hgetall("lost:status:kochava")
        # ...and was applied once.
        assert values[b"accepted"] == b"2"
        assert values[b"duplicate"] == b"1"
        assert values[b"last_success_at"].decode() == t2.isoformat()
    finally:
        server.stop()
