"""Retention (``[retention] raw_payload_days`` / ``device_ids_days``): old events lose their raw
payload and device ids, keep their mapped attribution, on SQLite and on a fresh PostgreSQL
database; from the gateway's periodic job and from ``gateway purge``. Dates are explicit (or
frozen with freezegun)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from freezegun import freeze_time
from litestar.testing import TestClient

from gateway import retention
from gateway.app import create_app
from gateway.config import ConfigError, RetentionConfig, load_config
from gateway.events import DEVICE_ID_FIELDS, AttributionEvent, event_encoder
from gateway.storage import Purged, Storage
from tests.fixtures import ADMIN_TOKEN, ROOT, kochava_samples, make_config, new_key
from tests.test_storage import opened, postgres_database, run

NOW = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)
RAW = {"click_ip": "203.0.113.7", "user_agent": "FakeApp/1.0", "transaction_id": "t"}
IDS = {
    "idfa": "6D92078A-8246-4BA4-AE5B-76104861E7DC",
    "idfv": "0B5B7D7E-3A4B-4C5D-8E9F-0A1B2C3D4E5F",
    "google_ad_id": "38400000-8cf0-11bd-b23e-10b96e40000d",
    "android_id": "9774d56d682e549c",
    "windows_ad_id": "win-ad-1",
    "partner_device_id": "kd-123",
}


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/data/gateway.db"
    else:
        with postgres_database() as pg_url:
            yield pg_url


def event(name: str, age: timedelta, **fields: Any) -> AttributionEvent:
    return AttributionEvent(
        kind="install",
        attributed=True,
        source="FakeNetwork Ads",
        campaign="spring",
        adgroup="pub_1",
        ad="banner",
        platform="ios",
        country="US",
        braze_id=f"braze-{name}",
        external_id=f"user-{name}",
        partner="kochava",
        dedupe_key=name,
        event_id=f"evt_{name}",
        received_at=NOW - age,
        raw={**RAW, "transaction_id": name},
        **{**IDS, **fields},
    )


def by_key(events: list[AttributionEvent]) -> dict[str, AttributionEvent]:
    return {e.dedupe_key: e for e in events}


async def stored(storage: Storage) -> dict[str, AttributionEvent]:
    return by_key(await storage.events(limit=-1))


OLD, MID, NEW = "old", "mid", "new"
AGES = {OLD: timedelta(days=40), MID: timedelta(days=10), NEW: timedelta(hours=1)}


def test_old_raw_payloads_go_and_the_attribution_stays(url: str) -> None:
    async def work(storage: Storage) -> None:
        await storage.store([event(name, age) for name, age in AGES.items()])
        before = await stored(storage)

        keep_30 = RetentionConfig(raw_payload_days=30)
        assert await retention.purge(storage, keep_30, NOW) == Purged(raw=1, device_ids=0)
        after = await stored(storage)
        assert after[OLD] == msgspec.structs.replace(before[OLD], raw={})
        assert after[MID] == before[MID] and after[NEW] == before[NEW]
        # Idempotent: nothing left to do, however often it runs.
        assert await retention.purge(storage, keep_30, NOW) == Purged()
        assert await retention.purge(storage, keep_30, NOW + timedelta(hours=1)) == Purged()
        # Ten days on, the middle one has come of age too.
        later = NOW + timedelta(days=21)
        assert await retention.purge(storage, keep_30, later) == Purged(raw=1)
        assert (await stored(storage))[MID].raw == {}
        assert (await stored(storage))[NEW].raw == before[NEW].raw

    run(url, work)


def test_device_ids_go_on_their_own_schedule_and_user_ids_stay(url: str) -> None:
    async def work(storage: Storage) -> None:
        await storage.store([event(name, age) for name, age in AGES.items()])
        before = await stored(storage)
        both = RetentionConfig(raw_payload_days=30, device_ids_days=7)
        assert await retention.purge(storage, both, NOW) == Purged(raw=1, device_ids=2)
        after = await stored(storage)
        for name in (OLD, MID):
            assert all(getattr(after[name], f) is None for f in DEVICE_ID_FIELDS)
            assert after[name].braze_id == f"braze-{name}"
            assert after[name].external_id == f"user-{name}"
            assert after[name].campaign == "spring" and after[name].source == "FakeNetwork Ads"
        assert after[OLD].raw == {} and after[MID].raw == before[MID].raw
        assert after[NEW] == before[NEW]
        assert await retention.purge(storage, both, NOW) == Purged()
        # Only device ids: raw payloads are kept however old.
        ids_only = RetentionConfig(device_ids_days=0 + 1)
        assert await retention.purge(storage, ids_only, NOW + timedelta(days=2)) == Purged(
            device_ids=1
        )
        assert (await stored(storage))[NEW].raw == before[NEW].raw

    run(url, work)


def test_nothing_goes_when_retention_is_off(url: str) -> None:
    async def work(storage: Storage) -> None:
        await storage.store([event(name, age * 100) for name, age in AGES.items()])
        before = await stored(storage)
        assert await retention.purge(storage, RetentionConfig(), NOW) == Purged()
        assert await stored(storage) == before

    assert RetentionConfig() == load_config(ROOT / "config" / "gateway.toml", env={}).retention
    run(url, work)


def test_a_remap_brings_the_raw_payload_back_and_the_next_purge_takes_it(url: str) -> None:
    async def work(storage: Storage) -> None:
        await storage.store([event(OLD, AGES[OLD])])
        keep_30 = RetentionConfig(raw_payload_days=30)
        assert await retention.purge(storage, keep_30, NOW) == Purged(raw=1)
        # gateway replay --update from an export made before the purge:
        remapped = msgspec.structs.replace(event(OLD, AGES[OLD]), campaign="renamed")
        assert [r.outcome for r in await storage.replace([remapped])] == ["updated"]
        assert (await stored(storage))[OLD].raw == remapped.raw
        assert await retention.purge(storage, keep_30, NOW) == Purged(raw=1)
        again = (await stored(storage))[OLD]
        assert again.raw == {} and again.campaign == "renamed"

    run(url, work)


def test_many_events_in_batches_and_two_purges_at_once(url: str) -> None:
    async def work(storage: Storage) -> None:
        events = [event(f"e{n:04d}", timedelta(days=31, minutes=n)) for n in range(250)]
        await storage.store(events)
        async with opened(url) as other:  # another process, purging at the same time
            done = await asyncio.gather(
                storage.purge(NOW - timedelta(days=30), None, batch=40),
                other.purge(NOW - timedelta(days=30), None, batch=40),
            )
        assert sum(d.raw for d in done) == 250  # each event purged once, by one of them
        assert all(e.raw == {} for e in (await stored(storage)).values())
        assert await storage.purge(NOW - timedelta(days=30), None, batch=40) == Purged()

    run(url, work)


def test_frozen_now_decides_what_is_old(url: str) -> None:
    async def work(storage: Storage) -> None:
        await storage.store([event(name, age) for name, age in AGES.items()])
        return None

    run(url, work)
    with freeze_time(NOW + timedelta(days=25), real_asyncio=True):  # MID is 35 days old
        done = run(url, lambda s: retention.purge(s, RetentionConfig(raw_payload_days=30)))
    assert done == Purged(raw=2)


# -- databases made before retention existed -----------------------------------------------------

OLD_SQLITE_EVENTS = """
CREATE TABLE events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT NOT NULL UNIQUE,
    partner     TEXT NOT NULL,
    dedupe_key  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    attributed  INTEGER NOT NULL,
    received_at TEXT NOT NULL,
    body        BLOB NOT NULL,
    UNIQUE (partner, dedupe_key)
)
"""

OLD_POSTGRES_EVENTS = """
CREATE TABLE events (
    seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    text NOT NULL UNIQUE,
    partner     text NOT NULL,
    dedupe_key  text NOT NULL,
    kind        text NOT NULL,
    attributed  boolean NOT NULL,
    received_at timestamptz,
    body        bytea NOT NULL,
    UNIQUE (partner, dedupe_key)
)
"""


def test_a_database_from_before_retention_is_upgraded_on_open(url: str) -> None:
    old = event(OLD, AGES[OLD])
    row = (old.event_id, "kochava", OLD, "install", True, old.received_at)
    if url.startswith("sqlite"):
        path = Path(url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True)
        with sqlite3.connect(path) as conn:
            conn.execute(OLD_SQLITE_EVENTS)
            conn.execute(
                "INSERT INTO events (event_id, partner, dedupe_key, kind, attributed,"
                " received_at, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (*row[:5], (NOW - AGES[OLD]).isoformat(), event_encoder.encode(old)),
            )
        conn.close()
    else:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(OLD_POSTGRES_EVENTS)
            conn.execute(
                "INSERT INTO events (event_id, partner, dedupe_key, kind, attributed,"
                " received_at, body) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (*row, event_encoder.encode(old)),
            )

    async def work(storage: Storage) -> None:
        assert (await stored(storage))[OLD].raw == old.raw
        assert await retention.purge(storage, RetentionConfig(raw_payload_days=30), NOW) == Purged(
            raw=1
        )
        assert (await stored(storage))[OLD].raw == {}

    run(url, work)
    assert run(url, lambda s: s.count()) == 1  # opened again: the upgrade is not re-done


# -- in the gateway and from the command line ----------------------------------------------------


def test_the_gateway_purges_periodically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retention, "FIRST_PURGE_AFTER_S", 0.05)
    monkeypatch.setattr(retention, "PURGE_EVERY_S", 0.1)
    config = make_config(tmp_path / "data")
    config.retention.raw_payload_days = 30
    now = datetime.now(UTC)
    old = msgspec.structs.replace(event(OLD, timedelta(0)), received_at=now - timedelta(days=31))
    run(config.storage.url, lambda s: s.store([old]))
    key = new_key(config)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    payload = json.loads(kochava_samples()["install_ios_attributed.json"])
    with TestClient(create_app(config)) as client:
        assert (
            client.post(
                "/partners/kochava/postback", params={"api_key": key}, json=payload
            ).status_code
            == 202
        )
        deadline = time.monotonic() + 10  # the job runs every 0.1 s here; 10 s is generous
        while True:
            events = by_key(
                [
                    msgspec.convert(e, AttributionEvent)
                    for e in client.get("/events", headers=admin).json()["events"]
                ]
            )
            if events[OLD].raw == {} or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert events[OLD].raw == {}
    assert events[OLD].campaign == "spring"
    assert events["fake-txn-0001"].raw == payload  # received now: kept


def test_gateway_purge_command(tmp_path: Path) -> None:
    data = tmp_path / "data"
    url = f"sqlite:///{data}/gateway.db"
    now = datetime.now(UTC)
    events = [
        msgspec.structs.replace(event(name, timedelta(0)), received_at=now - age)
        for name, age in AGES.items()
    ]
    run(url, lambda s: s.store(events))
    env = {
        "PATH": "/usr/bin:/bin",
        "GATEWAY_CONFIG": str(ROOT / "config" / "gateway.toml"),
        "GATEWAY_DATA_DIR": str(data),
        "GATEWAY_STORAGE_URL": url,
    }

    def purge(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "purge", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    off = purge()
    assert off.returncode == 0, off.stderr
    assert off.stdout.startswith("Nothing to purge")
    done = purge("--raw-payload-days", "30", "--device-ids-days", "5")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "Purged: raw payload removed from 1 event(s), device ids removed from 2 event(s)."
    )
    after = run(url, stored)
    assert after[OLD].raw == {} and after[MID].raw != {} and after[MID].idfa is None
    assert after[NEW].idfa == IDS["idfa"]
    assert purge("--raw-payload-days", "-1").returncode == 2


@pytest.mark.parametrize("setting", ["raw_payload_days", "device_ids_days"])
def test_bad_retention_is_refused(tmp_path: Path, setting: str) -> None:
    path = tmp_path / "g.toml"
    path.write_text(f"[retention]\n{setting} = -1\n")
    with pytest.raises(ConfigError, match=f"retention.{setting}"):
        load_config(path, env={})
