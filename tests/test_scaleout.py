"""Scale-out (docs/deployment.md): two ``gateway serve`` processes, as on two hosts, sharing one
PostgreSQL database (fresh, dropped afterwards) and one Redis (under a private key prefix), each
with its own data folder. What one does, the other sees at once: keys and their revocation,
dedupe, status counters and last_success_at, rate limits, the admin session; and the events they
accept are published to the stream once each, by whichever of them holds the outbox lease.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.fixtures import (
    ADMIN_TOKEN,
    REDIS_URL,
    ROOT,
    LiveGateway,
    kochava_samples,
    start_gateway,
    stop_gateway,
)
from tests.test_publish import CONSUMER, install, stream_ids, wait_until
from tests.test_storage import postgres_database

POSTBACK = "/partners/kochava/postback"
STATUS = "/partners/kochava/status"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SAMPLES = kochava_samples()
#: Requests per key and window, for both processes together.
RATE = 10


@pytest.fixture
def pair(tmp_path: Path, redis_prefix: str) -> Iterator[tuple[LiveGateway, LiveGateway]]:
    toml = (ROOT / "config" / "gateway.toml").read_text(encoding="utf-8")
    assert 'key_prefix = "gateway:"' in toml and "rate_per_key = 0" in toml
    config_file = tmp_path / "gateway.toml"  # as distributed to every host
    config_file.write_text(
        toml.replace('key_prefix = "gateway:"', f'key_prefix = "{redis_prefix}"').replace(
            "rate_per_key = 0", f"rate_per_key = {RATE}"
        )
    )
    with postgres_database() as url:
        env = {  # the same on every host; data folders are per host
            "GATEWAY_CONFIG": str(config_file),
            "GATEWAY_STORAGE_URL": url,
            "GATEWAY_REDIS_URL": REDIS_URL,
            "GATEWAY_KEY_SECRET": secrets.token_urlsafe(32),
        }
        for host in ("a", "b"):
            (tmp_path / host).mkdir()
        first = start_gateway(tmp_path / "a", env)
        try:
            second = start_gateway(tmp_path / "b", env)
            try:
                yield first, second
            finally:
                stop_gateway(second)
        finally:
            stop_gateway(first)


def post(gateway: LiveGateway, key: str, body: bytes) -> httpx.Response:
    return httpx.post(
        gateway.base_url + POSTBACK, params={"api_key": key}, content=body, timeout=30
    )


def create_key(gateway: LiveGateway) -> tuple[str, str]:
    """A new kochava key made with the gateway's own CLI: (key id, key)."""
    done = gateway.cli("keys", "create", "kochava")
    assert done.returncode == 0, done.stderr
    key_id = re.search(r"Created key (key_[0-9a-f]+)", done.stdout)
    assert key_id, done.stdout
    return key_id.group(1), done.stdout.strip().splitlines()[-1]


def revoke_on_page(signed_in_on: LiveGateway, revoked_on: LiveGateway, key_id: str) -> None:
    """Revoke through the partners page, as an operator would: signed in on one instance, the
    session is valid on the other (both sign with the same admin token)."""
    login = httpx.post(
        signed_in_on.base_url + "/login",
        data={"token": ADMIN_TOKEN},
        follow_redirects=False,
        timeout=30,
    )
    assert login.status_code == 303, login.text
    # The session cookie is Secure: kept by browsers on localhost, sent here by hand.
    cookie = {"Cookie": login.headers["set-cookie"].split(";", 1)[0]}
    with httpx.Client(base_url=revoked_on.base_url, headers=cookie, timeout=30) as web:
        page = web.get("/ui")
        assert page.status_code == 200, page.text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf, page.text
        done = web.post(
            f"/ui/partners/kochava/keys/{key_id}/revoke",
            data={"csrf": csrf.group(1)},
            follow_redirects=False,
        )
        assert done.status_code == 303, done.text
        assert done.headers["location"].startswith("/ui?done=revoked")


def status(gateway: LiveGateway) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(gateway.base_url + STATUS, headers=ADMIN, timeout=30).json()
    return answer


def test_two_gateway_processes_share_keys_dedupe_status_limits_and_the_outbox(
    pair: tuple[LiveGateway, LiveGateway], redis_prefix: str, tmp_path: Path
) -> None:
    a, b = pair

    # A key made through one works on both; dedupe holds across them.
    key_id, key = create_key(a)
    first = post(a, key, install(1))
    assert first.status_code == 202, first.text
    event_id = first.json()["event_id"]
    again = post(b, key, install(1))
    assert again.status_code == 200
    assert again.json() == {"status": "duplicate", "event_id": event_id}
    second = post(b, key, install(2))
    assert second.status_code == 202, second.text

    # Status is shared: counters and last_success_at agree on both.
    def both_counted() -> tuple[dict[str, Any], dict[str, Any]] | None:
        seen = status(a), status(b)
        counters = [s["counters"] for s in seen]
        if all(c["accepted"] == 2 and c["duplicate"] == 1 for c in counters):
            return seen
        return None

    on_a, on_b = wait_until(both_counted, "status counted on both processes")
    assert on_a["connected"] and on_a["last_success_at"] is not None
    assert on_a["last_success_at"] == on_b["last_success_at"]
    assert on_a["counters"] == on_b["counters"]

    # Revoked through one, refused by the other at once (no cache of keys anywhere).
    revoke_on_page(a, b, key_id)
    refused = post(a, key, install(3))
    assert refused.status_code == 401, refused.text
    assert post(b, key, install(3)).status_code == 401

    # Concurrent batches through both; the rate limit is one budget for both.
    _, busy_key = create_key(b)
    bodies = [
        b"[" + b",".join(install(1000 + 20 * n + i) for i in range(20)) + b"]" for n in range(RATE)
    ]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(
            pool.map(lambda n: post((a, b)[n % 2], busy_key, bodies[n]), range(len(bodies)))
        )
    assert [r.status_code for r in answers] == [202] * RATE
    batched = [r["event_id"] for answer in answers for r in answer.json()["results"]]
    accepted = [event_id, second.json()["event_id"], *batched]
    for gateway in (a, b):
        limited = post(gateway, busy_key, install(5000))
        assert limited.status_code == 429, limited.text
        assert int(limited.headers["retry-after"]) >= 1

    # Each accepted event is published once, whichever process accepted it.
    client = redis.Redis.from_url(REDIS_URL)
    try:
        stream = f"{redis_prefix}events"
        published = stream_ids(client, stream, len(accepted))
        assert len(published) == len(set(published)) == len(accepted)
        assert set(published) == set(accepted)
    finally:
        client.close()

    # And the consumer example takes each once.
    done = subprocess.run(
        [
            *(sys.executable, str(CONSUMER), "--redis-url", REDIS_URL, "--stream", stream),
            *("--consumer", "c1", "--sink", str(tmp_path / "sink.db"), "--until-idle", "1"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["processed"] == len(published) and counts["duplicates"] == 0
