"""Idempotent storage (DESIGN.md §1 step 7). Done when: sending the same attributed install
20 times, 10 of them concurrently, stores exactly one event; the rest answer 200 duplicate."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import TestClient

from gateway.status.buffer import FLUSH_AFTER_S
from tests.fixtures import (
    ADMIN_TOKEN,
    REDIS_URL,
    ROOT,
    LiveGateway,
    kochava_samples,
    start_gateway,
    stop_gateway,
)
from tests.test_storage import postgres_database

SAMPLES = kochava_samples()
INSTALL = SAMPLES["install_ios_attributed.json"]
POSTBACK = "/partners/kochava/postback"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def assert_one_accepted(answers: list[tuple[int, dict[str, Any]]]) -> str:
    """Exactly one 202 accepted, every other answer 200 duplicate, all naming the same event."""
    assert len(answers) == 20
    codes = Counter(code for code, _ in answers)
    assert codes == {202: 1, 200: 19}, answers
    (accepted,) = [body for code, body in answers if code == 202]
    assert accepted["status"] == "accepted"
    event_id = str(accepted["event_id"])
    assert event_id
    for code, body in answers:
        if code == 200:
            assert body == {"status": "duplicate", "event_id": event_id}
    return event_id


def assert_stored_once(events: list[dict[str, Any]], event_id: str, dedupe_key: str) -> None:
    same = [e for e in events if e["dedupe_key"] == dedupe_key]
    assert [e["event_id"] for e in same] == [event_id]
    assert len(events) == 1


async def send_20(base_urls: list[str], key: str, body: bytes = INSTALL) -> list[tuple[int, Any]]:
    """10 concurrent sends (spread over ``base_urls``), then 10 one after the other."""
    async with httpx.AsyncClient(timeout=30) as http:

        async def send(i: int) -> tuple[int, Any]:
            response = await http.post(
                base_urls[i % len(base_urls)] + POSTBACK, params={"api_key": key}, content=body
            )
            return response.status_code, response.json()

        answers = list(await asyncio.gather(*(send(i) for i in range(10))))
        for i in range(10):
            answers.append(await send(i))
    return answers


def live_events(gateway: LiveGateway) -> list[dict[str, Any]]:
    response = httpx.get(
        gateway.base_url + "/events",
        params={"partner": "kochava", "limit": 1000},
        headers=ADMIN,
        timeout=10,
    )
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return events


# -- a real gateway process -------------------------------------------------------------------


def test_same_install_20_times_10_concurrently_stores_one_event(
    live_gateway: LiveGateway,
) -> None:
    key = live_gateway.create_key()
    answers = asyncio.run(send_20([live_gateway.base_url], key))
    event_id = assert_one_accepted(answers)
    assert_stored_once(live_events(live_gateway), event_id, "fake-txn-0001")

    status = httpx.get(
        live_gateway.base_url + "/partners/kochava/status", headers=ADMIN, timeout=10
    ).json()
    assert status["counters"]["accepted"] == 1
    assert status["counters"]["duplicate"] == 19


def assert_counts_settle(gateway: LiveGateway, accepted: int, duplicate: int) -> dict[str, Any]:
    """The status counters as the gateway shows them once every process's status updates are
    written: a process writes its own within a moment (``FLUSH_AFTER_S``) and before reading;
    another's show up within that moment."""
    deadline = time.monotonic() + 5
    while True:
        status: dict[str, Any] = httpx.get(
            gateway.base_url + "/partners/kochava/status", headers=ADMIN, timeout=10
        ).json()
        seen = (status["counters"]["accepted"], status["counters"]["duplicate"])
        if seen == (accepted, duplicate) or time.monotonic() > deadline:
            break
        time.sleep(FLUSH_AFTER_S)
    assert seen == (accepted, duplicate)
    return status


def test_two_processes_over_one_sqlite_file_store_one_event(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    env = {
        "GATEWAY_DATA_DIR": str(shared),
        "GATEWAY_STORAGE_URL": f"sqlite:///{shared}/gateway.db",
    }
    gateways: list[LiveGateway] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            gateways.append(start_gateway(tmp_path / name, env))
        a, b = gateways
        assert a.base_url != b.base_url
        key = a.create_key()
        answers = asyncio.run(send_20([a.base_url, b.base_url], key))
        event_id = assert_one_accepted(answers)
        for gateway in gateways:
            assert_stored_once(live_events(gateway), event_id, "fake-txn-0001")
        # Both processes share the embedded status store in the same data folder.
        for gateway in gateways:
            assert_counts_settle(gateway, accepted=1, duplicate=19)
    finally:
        for gateway in gateways:
            stop_gateway(gateway)
    for gateway in gateways:
        assert gateway.process.poll() is not None


def test_two_processes_over_postgres_and_redis_store_one_event(
    tmp_path: Path, redis_prefix: str
) -> None:
    """The production layout: two gateway processes sharing one PostgreSQL database (a fresh
    one) and one Redis (under a private key prefix), the same postback sent to both at once."""
    config_file = tmp_path / "gateway.toml"
    toml = (ROOT / "config" / "gateway.toml").read_text()
    assert 'key_prefix = "gateway:"' in toml
    config_file.write_text(
        toml.replace('key_prefix = "gateway:"', f'key_prefix = "{redis_prefix}"')
    )
    with postgres_database() as url:
        env = {
            "GATEWAY_CONFIG": str(config_file),
            "GATEWAY_STORAGE_URL": url,
            "GATEWAY_REDIS_URL": REDIS_URL,
            # Hosts sharing a database share the secret their key hashes are keyed with.
            "GATEWAY_KEY_SECRET": "two-processes-share-this-key-secret-0123456789",
        }
        gateways: list[LiveGateway] = []
        try:
            for name in ("a", "b"):
                (tmp_path / name).mkdir()
                gateways.append(start_gateway(tmp_path / name, env))
            a, b = gateways
            key = a.create_key()
            answers = asyncio.run(send_20([a.base_url, b.base_url], key))
            event_id = assert_one_accepted(answers)
            for gateway in gateways:
                assert_stored_once(live_events(gateway), event_id, "fake-txn-0001")
                status = assert_counts_settle(gateway, accepted=1, duplicate=19)
                assert status["connected"] is True
        finally:
            for gateway in gateways:
                stop_gateway(gateway)


# -- in process, over both status stores -----------------------------------------------------


def send_20_in_process(client: TestClient[Any], key: str, body: bytes) -> list[tuple[int, Any]]:
    def send(_: int) -> tuple[int, Any]:
        response = client.post(POSTBACK, params={"api_key": key}, content=body)
        return response.status_code, response.json()

    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(send, range(10)))
    answers += [send(i) for i in range(10)]
    return answers


def events_of(client: TestClient[Any], admin: dict[str, str]) -> list[dict[str, Any]]:
    response = client.get("/events", params={"partner": "kochava", "limit": 1000}, headers=admin)
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return events


@pytest.mark.parametrize("with_transaction_id", [True, False], ids=["partner_id", "hashed"])
def test_same_install_20_times_in_process(
    client: TestClient[Any],
    admin: dict[str, str],
    api_key: str,
    status_backend: str,
    with_transaction_id: bool,
) -> None:
    payload = json.loads(INSTALL)
    if not with_transaction_id:
        del payload["transaction_id"]  # the dedupe key is then a hash of the payload
    answers = send_20_in_process(client, api_key, json.dumps(payload).encode())
    event_id = assert_one_accepted(answers)

    (event,) = events_of(client, admin)
    assert event["event_id"] == event_id
    if with_transaction_id:
        assert event["dedupe_key"] == "fake-txn-0001"
    else:
        assert event["dedupe_key"].startswith("sha256:")

    status = client.get("/partners/kochava/status", headers=admin).json()
    assert status["counters"] == {
        "accepted": 1,
        "duplicate": 19,
        "ignored_organic": 0,
        "ignored_restricted": 0,
        "rejected": 0,
        "unauthorized": 0,
        "rate_limited": 0,
    }


@pytest.mark.parametrize("with_transaction_id", [True, False], ids=["partner_id", "hashed"])
def test_retry_with_reordered_keys_and_key_elsewhere_is_a_duplicate(
    client: TestClient[Any],
    admin: dict[str, str],
    api_key: str,
    status_backend: str,
    with_transaction_id: bool,
) -> None:
    payload = json.loads(INSTALL)
    if not with_transaction_id:
        del payload["transaction_id"]
    first = client.post(
        POSTBACK, params={"api_key": api_key}, content=json.dumps(payload, indent=2).encode()
    )
    assert first.status_code == 202, first.text
    event_id = first.json()["event_id"]

    reordered = dict(reversed(list(payload.items())))
    assert list(reordered) != list(payload)
    body = json.dumps(reordered, separators=(",", ":")).encode()
    retries = [
        client.post(POSTBACK, content=body, headers={"X-Api-Key": api_key}),
        client.post(POSTBACK, content=body, headers={"Authorization": f"Bearer {api_key}"}),
        client.post(
            POSTBACK,
            content=json.dumps({"api_key": api_key, **reordered}).encode(),
            headers={"Content-Type": "text/plain"},
        ),
    ]
    for retry in retries:
        assert (retry.status_code, retry.json()) == (
            200,
            {"status": "duplicate", "event_id": event_id},
        )

    (event,) = events_of(client, admin)
    assert event["event_id"] == event_id
    assert "api_key" not in event["raw"]
    status = client.get("/partners/kochava/status", headers=admin).json()
    assert (status["counters"]["accepted"], status["counters"]["duplicate"]) == (1, 3)
