"""Per-partner connection status (DESIGN.md §6) over both status stores: the embedded SQLite one
and the real Redis server. Only an accepted attributed install moves ``last_success_at``; every
other outcome moves exactly one counter. Times are frozen with freezegun (``real_asyncio=True``:
the test client runs its event loop in a thread)."""

from __future__ import annotations

import json
import logging
import socket
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from freezegun import freeze_time
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.config import Config
from gateway.status import COUNTERS
from tests.fixtures import (
    REDIS_URL,
    ROOT,
    LiveGateway,
    kochava_samples,
    make_config,
    new_key,
    start_gateway,
    stop_gateway,
)

SAMPLES = kochava_samples()
POSTBACK = "/partners/kochava/postback"
STATUS = "/partners/kochava/status"

# Frozen times, as sent and as the API must show them (ISO-8601, UTC, "Z").
T = "2024-06-01T12:00:00.123456Z"
T_ORGANIC = "2024-06-01T13:00:00Z"
T_EVENT = "2024-06-01T14:00:00Z"
T_DUPLICATE = "2024-06-01T15:00:00Z"
T_UNAUTHORIZED = "2024-06-01T16:00:00Z"
T_MALFORMED = "2024-06-01T17:00:00Z"
T_UNUSABLE = "2024-06-01T18:00:00Z"
T_BETWEEN = "2024-06-02T00:00:00Z"
T2 = "2024-06-02T08:30:00Z"


def sample(name: str, **changes: Any) -> bytes:
    """A Kochava sample with fields changed (None removes a field)."""
    payload = json.loads(SAMPLES[name])
    for field, value in changes.items():
        if value is None:
            payload.pop(field, None)
        else:
            payload[field] = value
    return json.dumps(payload).encode()


def post(client: TestClient[Any], body: bytes, key: str, at: str) -> httpx.Response:
    with freeze_time(at, real_asyncio=True):
        return client.post(
            POSTBACK,
            params={"api_key": key},
            content=body,
            headers={"Content-Type": "application/json"},
        )


def status(client: TestClient[Any], admin: dict[str, str]) -> dict[str, Any]:
    response = client.get(STATUS, headers=admin)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def counters(**moved: int) -> dict[str, int]:
    out = dict.fromkeys(COUNTERS, 0)
    for name, n in moved.items():
        assert name in out, name
        out[name] = n
    return out


def stored(client: TestClient[Any], admin: dict[str, str]) -> list[dict[str, Any]]:
    response = client.get("/events", params={"partner": "kochava", "limit": 1000}, headers=admin)
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return events


def backend_config(
    request: pytest.FixtureRequest, data_dir: Path, status_backend: str, **partners: bool
) -> Config:
    prefix = request.getfixturevalue("redis_prefix") if status_backend == "redis" else None
    return make_config(data_dir, prefix, **partners)


def assert_status(body: dict[str, Any], last_success_at: str | None, **moved: int) -> None:
    assert body["enabled"] is True
    assert body["connected"] is (last_success_at is not None)
    assert body["last_success_at"] == last_success_at
    assert body["counters"] == counters(**moved)


# -- the status of one partner -----------------------------------------------------------------


def test_status_before_anything(
    client: TestClient[Any], admin: dict[str, str], status_backend: str
) -> None:
    assert status(client, admin) == {
        "partner": "kochava",
        "display_name": "Kochava",
        "enabled": True,
        "connected": False,
        "last_success_at": None,
        "endpoint": "/partners/kochava/postback",
        "counters": counters(),
    }


def test_attributed_install_connects_at_its_time(
    client: TestClient[Any], admin: dict[str, str], api_key: str, status_backend: str
) -> None:
    response = post(client, SAMPLES["install_ios_attributed.json"], api_key, T)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "accepted"

    body = status(client, admin)
    assert_status(body, T, accepted=1)
    parsed = datetime.fromisoformat(body["last_success_at"])
    assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0
    assert parsed == datetime(2024, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)
    # The stored event was received at the same moment.
    (event,) = stored(client, admin)
    assert event["received_at"] == T


def test_only_an_accepted_attributed_install_moves_last_success_at(
    client: TestClient[Any], admin: dict[str, str], api_key: str, status_backend: str
) -> None:
    first = post(client, SAMPLES["install_ios_attributed.json"], api_key, T)
    assert first.status_code == 202, first.text
    event_id = first.json()["event_id"]
    assert_status(status(client, admin), T, accepted=1)

    organic = post(client, SAMPLES["install_organic.json"], api_key, T_ORGANIC)
    assert (organic.status_code, organic.json()) == (
        200,
        {"status": "ignored", "reason": "organic"},
    )
    assert_status(status(client, admin), T, accepted=1, ignored_organic=1)

    purchase = post(client, SAMPLES["event_reengagement_purchase.json"], api_key, T_EVENT)
    assert purchase.status_code == 202, purchase.text
    assert purchase.json()["kind"] == "reengagement"
    assert_status(status(client, admin), T, accepted=2, ignored_organic=1)

    again = post(client, SAMPLES["install_ios_attributed.json"], api_key, T_DUPLICATE)
    assert (again.status_code, again.json()) == (
        200,
        {"status": "duplicate", "event_id": event_id},
    )
    assert_status(status(client, admin), T, accepted=2, ignored_organic=1, duplicate=1)

    # A different, new install: had it been accepted it would have moved last_success_at.
    fresh = sample("install_ios_attributed.json", transaction_id="fake-txn-status-1")
    wrong_key = post(client, fresh, "gwk_" + "x" * 43, T_UNAUTHORIZED)
    assert wrong_key.status_code == 401, wrong_key.text
    assert wrong_key.json()["error"] == "unauthorized"
    assert_status(
        status(client, admin), T, accepted=2, ignored_organic=1, duplicate=1, unauthorized=1
    )

    malformed = post(client, fresh[:-10], api_key, T_MALFORMED)
    assert malformed.status_code == 400, malformed.text
    assert malformed.json()["error"] == "bad_request"
    assert "JSON" in malformed.json()["reason"]
    assert_status(
        status(client, admin),
        T,
        accepted=2,
        ignored_organic=1,
        duplicate=1,
        unauthorized=1,
        rejected=1,
    )

    unusable = sample(
        "install_ios_attributed.json", transaction_id="fake-txn-status-2", install_time="soon"
    )
    refused = post(client, unusable, api_key, T_UNUSABLE)
    assert refused.status_code == 422, refused.text
    assert refused.json()["field"] == "install_time"
    assert_status(
        status(client, admin),
        T,
        accepted=2,
        ignored_organic=1,
        duplicate=1,
        unauthorized=1,
        rejected=2,
    )

    # Stored: the install and the purchase, nothing else.
    assert sorted(e["dedupe_key"] for e in stored(client, admin)) == [
        "fake-txn-0001",
        "fake-txn-0004",
    ]

    later = post(client, SAMPLES["install_android_identity_link.json"], api_key, T2)
    assert later.status_code == 202, later.text
    assert_status(
        status(client, admin),
        T2,
        accepted=3,
        ignored_organic=1,
        duplicate=1,
        unauthorized=1,
        rejected=2,
    )


def test_second_install_moves_last_success_at_forward_never_back(
    client: TestClient[Any], admin: dict[str, str], api_key: str, status_backend: str
) -> None:
    assert post(client, SAMPLES["install_ios_attributed.json"], api_key, T).status_code == 202
    assert_status(status(client, admin), T, accepted=1)

    later = post(client, SAMPLES["install_android_identity_link.json"], api_key, T2)
    assert later.status_code == 202, later.text
    assert_status(status(client, admin), T2, accepted=2)

    # An install accepted with an earlier clock (another process, a skewed host) is counted but
    # does not move the time back.
    late = post(client, SAMPLES["install_ios_zeroed_idfa.json"], api_key, T_BETWEEN)
    assert late.status_code == 202, late.text
    assert_status(status(client, admin), T2, accepted=3)


def test_restricted_network_is_ignored_and_not_stored(
    client: TestClient[Any], admin: dict[str, str], api_key: str, status_backend: str
) -> None:
    facebook = sample(
        "install_ios_attributed.json",
        network_name="Facebook Ads",
        transaction_id="fake-txn-facebook",
    )
    # Before any install: a restricted install does not connect the partner.
    response = post(client, facebook, api_key, T)
    assert (response.status_code, response.json()) == (
        200,
        {"status": "ignored", "reason": "restricted_network"},
    )
    assert_status(status(client, admin), None, ignored_restricted=1)
    assert stored(client, admin) == []

    assert post(client, SAMPLES["install_ios_attributed.json"], api_key, T).status_code == 202
    response = post(client, facebook, api_key, T2)
    assert (response.status_code, response.json()) == (
        200,
        {"status": "ignored", "reason": "restricted_network"},
    )
    assert_status(status(client, admin), T, accepted=1, ignored_restricted=2)
    assert [e["dedupe_key"] for e in stored(client, admin)] == ["fake-txn-0001"]


# -- the partner list and a disabled partner ---------------------------------------------------


def test_partner_list_shows_the_same_status(
    client: TestClient[Any], admin: dict[str, str], api_key: str, status_backend: str
) -> None:
    assert post(client, SAMPLES["install_ios_attributed.json"], api_key, T).status_code == 202
    assert post(client, SAMPLES["install_organic.json"], api_key, T2).status_code == 200

    response = client.get("/partners", headers=admin)
    assert response.status_code == 200, response.text
    partners = response.json()["partners"]
    assert [p["partner"] for p in partners] == sorted(p["partner"] for p in partners)
    (kochava,) = [p for p in partners if p["partner"] == "kochava"]
    assert kochava == status(client, admin)
    assert_status(kochava, T, accepted=1, ignored_organic=1)


def test_disabled_partner_shows_disabled_and_answers_403(
    request: pytest.FixtureRequest, tmp_path: Path, admin: dict[str, str], status_backend: str
) -> None:
    config = backend_config(request, tmp_path / "data", status_backend, kochava=False)
    key = new_key(config)
    with TestClient(create_app(config)) as client:
        body = status(client, admin)
        assert body["enabled"] is False
        assert body["connected"] is False

        for sent_key in (key, "gwk_wrong"):
            response = post(client, SAMPLES["install_ios_attributed.json"], sent_key, T)
            assert response.status_code == 403, response.text
            assert response.json()["error"] == "forbidden"
            assert "disabled" in response.json()["reason"]
        response = client.get(POSTBACK, params={"api_key": key, "network_name": "FakeNetwork Ads"})
        assert response.status_code == 403, response.text

        after = status(client, admin)
        assert after == body
        assert after["last_success_at"] is None
        assert after["counters"] == counters()
        assert stored(client, admin) == []

        listed = client.get("/partners", headers=admin).json()["partners"]
        (kochava,) = [p for p in listed if p["partner"] == "kochava"]
        assert kochava == after


# -- the CLI -----------------------------------------------------------------------------------


def cli_status_line(gateway: LiveGateway) -> list[str]:
    done = gateway.cli("status")
    assert done.returncode == 0, done.stderr
    lines = [line.split() for line in done.stdout.splitlines()]
    assert lines[0][:4] == ["partner", "enabled", "connected", "last_success_at"]
    (row,) = [line for line in lines[1:] if line[0] == "kochava"]
    return row


@pytest.fixture
def status_gateway(
    request: pytest.FixtureRequest, tmp_path: Path, status_backend: str
) -> Iterator[LiveGateway]:
    """A gateway process over the embedded status store (the ``live_gateway`` fixture), or over
    Redis with this test's private key prefix."""
    if status_backend == "embedded":
        live: LiveGateway = request.getfixturevalue("live_gateway")
        yield live
        return
    prefix = request.getfixturevalue("redis_prefix")
    toml = (ROOT / "config" / "gateway.toml").read_text(encoding="utf-8")
    assert 'key_prefix = "gateway:"' in toml
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(toml.replace('key_prefix = "gateway:"', f'key_prefix = "{prefix}"'))
    gateway = start_gateway(
        tmp_path, {"GATEWAY_CONFIG": str(config_file), "GATEWAY_REDIS_URL": REDIS_URL}
    )
    try:
        yield gateway
    finally:
        stop_gateway(gateway)


def test_cli_status_prints_connected_with_the_time(
    status_gateway: LiveGateway, admin: dict[str, str], status_backend: str
) -> None:
    row = cli_status_line(status_gateway)
    assert row[1:4] == ["yes", "no", "-"]
    assert "accepted=0" in row

    key = status_gateway.create_key()
    before = datetime.now(UTC)
    response = httpx.post(
        status_gateway.base_url + POSTBACK,
        params={"api_key": key},
        content=SAMPLES["install_ios_attributed.json"],
        timeout=10,
    )
    after = datetime.now(UTC)
    assert response.status_code == 202, response.text

    api = httpx.get(status_gateway.base_url + STATUS, headers=admin, timeout=10).json()
    assert api["connected"] is True

    row = cli_status_line(status_gateway)
    assert row[1:3] == ["yes", "yes"]
    printed = datetime.fromisoformat(row[3])
    assert printed.utcoffset() is not None and printed.utcoffset().total_seconds() == 0
    assert printed == datetime.fromisoformat(api["last_success_at"])
    assert before <= printed <= after
    assert row[4:] == [f"{name}={1 if name == 'accepted' else 0}" for name in COUNTERS]


# -- a failing status store --------------------------------------------------------------------


def test_status_store_down_does_not_fail_an_accepted_postback(
    tmp_path: Path, admin: dict[str, str]
) -> None:
    """Redis refusing connections: the event is durable, so the partner gets 202; only the
    status endpoints say 503. (Redis-only by nature: the embedded store is a local file.)"""
    config = make_config(tmp_path / "data")
    config.status.redis_url = "redis://127.0.0.1:1/0"
    key = new_key(config)
    with TestClient(create_app(config)) as client:
        response = post(client, SAMPLES["install_ios_attributed.json"], key, T)
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "accepted"
        assert [(e["event_id"], e["dedupe_key"]) for e in stored(client, admin)] == [
            (response.json()["event_id"], "fake-txn-0001")
        ]

        again = post(client, SAMPLES["install_ios_attributed.json"], key, T2)
        assert (again.status_code, again.json()["status"]) == (200, "duplicate")
        assert post(client, SAMPLES["install_organic.json"], key, T2).status_code == 200
        assert post(client, SAMPLES["install_organic.json"], "gwk_wrong", T2).status_code == 401

        for path in (STATUS, "/partners"):
            down = client.get(path, headers=admin)
            assert down.status_code == 503, down.text
            assert down.headers["content-type"].startswith("application/json")
            body = down.json()
            assert body["error"] == "status_unavailable"
            assert "redis" in body["reason"]
        assert client.get("/healthz").status_code == 200


@pytest.fixture
def hung_redis() -> Iterator[str]:
    """A port that accepts TCP connections and never answers, like a hung Redis."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"


def test_stuck_status_store_does_not_delay_an_accepted_postback(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    admin: dict[str, str],
    status_backend: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A status store that does not answer (Redis hung, status.db write-locked by another
    process) may not hold the partner's answer past its timeout (Branch waits 2 s): postbacks
    never wait for status, which is written behind them; the failed write is logged and
    counted, and the update stays pending until the store takes it."""
    config = make_config(tmp_path / "data")
    if status_backend == "redis":
        config.status.redis_url = request.getfixturevalue("hung_redis")
    key = new_key(config)
    with TestClient(create_app(config)) as client:
        lock = None
        if status_backend == "embedded":
            lock = sqlite3.connect(tmp_path / "data" / "status.db", isolation_level=None)
            lock.execute("BEGIN IMMEDIATE")
        try:
            with caplog.at_level(logging.WARNING, logger="gateway.status"):
                started = time.monotonic()
                response = post(client, SAMPLES["install_ios_attributed.json"], key, T)
                assert time.monotonic() - started < 1.0
                assert response.status_code == 202, response.text
                (event,) = stored(client, admin)
                assert event["event_id"] == response.json()["event_id"]
                deadline = time.monotonic() + 10
                while "update(s) pending" not in caplog.text:  # the store's own timeout
                    assert time.monotonic() < deadline, caplog.text
                    time.sleep(0.1)
            assert "status_errors_total 1.0" in client.get("/metrics").text
        finally:
            if lock is not None:
                lock.execute("ROLLBACK")
                lock.close()

        if status_backend == "redis":
            down = client.get(STATUS, headers=admin)
            assert down.status_code == 503, down.text
            assert down.json()["error"] == "status_unavailable"
        else:
            # The lock is gone: the pending update is written by the retry, or the read.
            assert_status(status(client, admin), T, accepted=1)
