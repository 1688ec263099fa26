"""The SQLite storage's cache of active key hashes (gateway/storage/sqlite.py): each storage
keeps every partner's hashes under a change stamp, eight bytes in ``<database>-keys`` mapped
into memory by every process using the database and changed by add_key, revoke_key and
update_key_hash once committed. A change made through another storage (another process: the
CLI, another worker) is seen by the very next read, with no wait; a copy is read again after
KEY_CACHE_MAX_AGE_S even when the stamp did not change.

Real SQLite files, real processes (``gateway keys …`` and ``gateway serve --workers 2``), real
time.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

import gateway.storage.sqlite as sqlite_storage
from gateway.metrics import MULTIPROC_FOLDER
from gateway.storage import Storage
from tests.fixtures import ROOT, kochava_samples, start_gateway, stop_gateway
from tests.test_storage import key_record, opened

HASHES = list[tuple[str, str]]


def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "gateway.db"


def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{db_path(tmp_path)}"


def cli_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a ``gateway`` command on the database under ``tmp_path``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        {
            "GATEWAY_CONFIG": str(ROOT / "config" / "gateway.toml"),
            "GATEWAY_DATA_DIR": str(tmp_path / "data"),
            "GATEWAY_STORAGE_URL": db_url(tmp_path),
        }
    )
    return env


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


# -- two storages on one database ------------------------------------------------------------


def test_a_revocation_through_another_storage_is_seen_at_once(tmp_path: Path) -> None:
    """Storage A has the key cached; storage B, opened afterwards on the same file (a CLI run),
    revokes it and closes: A's very next read no longer has it."""

    async def main() -> tuple[HASHES, HASHES, HASHES, HASHES]:
        async with opened(db_url(tmp_path)) as a:
            await a.add_key(key_record("key_1"), "hash-1")
            await a.add_key(key_record("key_2"), "hash-2")
            first = sorted(await a.active_key_hashes("kochava"))
            cached = sorted(await a.active_key_hashes("kochava"))
            async with opened(db_url(tmp_path)) as b:
                assert await b.revoke_key("key_1", datetime.now(UTC))
            after = await a.active_key_hashes("kochava")
            again = await a.active_key_hashes("kochava")
            return first, cached, after, again

    first, cached, after, again = asyncio.run(main())
    assert first == cached == [("key_1", "hash-1"), ("key_2", "hash-2")]
    assert after == again == [("key_2", "hash-2")]


def test_a_key_added_through_another_storage_is_seen_at_once(tmp_path: Path) -> None:
    """A has the partner's list cached (empty, then one key); keys added through B are in A's
    very next read, B still open or closed."""

    async def main() -> tuple[HASHES, HASHES, HASHES, HASHES]:
        async with opened(db_url(tmp_path)) as a, opened(db_url(tmp_path)) as b:
            empty = await a.active_key_hashes("kochava")
            await b.add_key(key_record("key_1"), "hash-1")
            one = await a.active_key_hashes("kochava")
            await b.add_key(key_record("key_2"), "hash-2")
            two = sorted(await a.active_key_hashes("kochava"))
            other = await a.active_key_hashes("appsflyer")
            return empty, one, two, other

    empty, one, two, other = asyncio.run(main())
    assert empty == []
    assert one == [("key_1", "hash-1")]
    assert two == [("key_1", "hash-1"), ("key_2", "hash-2")]
    assert other == []


def test_a_rehash_through_another_storage_is_seen_at_once(tmp_path: Path) -> None:
    async def main() -> tuple[HASHES, HASHES]:
        async with opened(db_url(tmp_path)) as a, opened(db_url(tmp_path)) as b:
            await a.add_key(key_record("key_1"), "plain-hash")
            before = await a.active_key_hashes("kochava")
            await b.update_key_hash("key_1", "plain-hash", "keyed-hash")
            return before, await a.active_key_hashes("kochava")

    before, after = asyncio.run(main())
    assert before == [("key_1", "plain-hash")]
    assert after == [("key_1", "keyed-hash")]


def test_changes_through_the_same_storage_are_seen_at_once(tmp_path: Path) -> None:
    async def main() -> list[HASHES]:
        async with opened(db_url(tmp_path)) as a:
            seen = [await a.active_key_hashes("kochava")]
            await a.add_key(key_record("key_1"), "hash-1")
            seen.append(await a.active_key_hashes("kochava"))
            await a.update_key_hash("key_1", "hash-1", "hash-1b")
            seen.append(await a.active_key_hashes("kochava"))
            await a.revoke_key("key_1", datetime.now(UTC))
            seen.append(await a.active_key_hashes("kochava"))
            return seen

    assert asyncio.run(main()) == [[], [("key_1", "hash-1")], [("key_1", "hash-1b")], []]


def test_a_caller_changing_its_answer_does_not_change_the_cache(tmp_path: Path) -> None:
    async def main() -> HASHES:
        async with opened(db_url(tmp_path)) as a:
            await a.add_key(key_record("key_1"), "hash-1")
            answer = await a.active_key_hashes("kochava")
            answer.clear()
            answer.append(("key_x", "forged"))
            return await a.active_key_hashes("kochava")

    assert asyncio.run(main()) == [("key_1", "hash-1")]


def test_a_revocation_by_the_cli_process_is_seen_at_once(tmp_path: Path) -> None:
    """``gateway keys create`` and ``gateway keys revoke``, each its own process, while this
    process's storage holds the partner's keys cached."""

    async def read(storage: Storage) -> list[str]:
        return [key_id for key_id, _ in await storage.active_key_hashes("kochava")]

    async def main() -> tuple[list[str], list[str], list[str]]:
        async with opened(db_url(tmp_path)) as a:
            empty = await read(a)
            created = cli(tmp_path, "keys", "create", "kochava").stdout
            key_id = created.split("Created key ")[1].split()[0]
            one = await read(a)
            assert one == [key_id]
            cli(tmp_path, "keys", "revoke", key_id)
            return empty, one, await read(a)

    empty, one, after = asyncio.run(main())
    assert empty == []
    assert len(one) == 1
    assert after == []


# -- the cache's age -----------------------------------------------------------------------------


def test_the_cache_is_read_again_after_its_max_age_without_a_stamp_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change made straight in the table (a process that died between its commit and its
    stamp) is not seen while the copy is younger than KEY_CACHE_MAX_AGE_S, and is once it is
    older."""
    max_age = 1.0
    monkeypatch.setattr(sqlite_storage, "KEY_CACHE_MAX_AGE_S", max_age)

    async def main() -> tuple[HASHES, HASHES, float, HASHES]:
        async with opened(db_url(tmp_path)) as a:
            await a.add_key(key_record("key_1"), "hash-1")
            cached_at = time.monotonic()
            before = await a.active_key_hashes("kochava")
            conn = sqlite3.connect(db_path(tmp_path))
            try:
                with conn:
                    conn.execute(
                        "UPDATE api_keys SET revoked_at = ? WHERE key_id = 'key_1'", ("x",)
                    )
            finally:
                conn.close()
            stale = await a.active_key_hashes("kochava")
            young = time.monotonic() - cached_at
            await asyncio.sleep(max_age + 0.1 - (time.monotonic() - cached_at))
            return before, stale, young, await a.active_key_hashes("kochava")

    before, stale, young, after = asyncio.run(main())
    assert before == [("key_1", "hash-1")]
    assert young < max_age
    assert stale == [("key_1", "hash-1")]  # cached: the stamp did not change
    assert after == []


# -- a live gateway with two workers -------------------------------------------------------------


def served(data_dir: Path, outcome: str) -> dict[str, float]:
    """Postbacks each worker process answered with ``outcome``, by the name of its own file in
    the multiprocess metrics folder."""
    counts: dict[str, float] = {}
    for values in sorted((data_dir / MULTIPROC_FOLDER).glob("counter_*.db")):
        counts[values.name] = sum(
            sample.value
            for family in MultiProcessCollector.merge([str(values)])
            for sample in family.samples
            if sample.name == "gateway_postbacks_total" and sample.labels["outcome"] == outcome
        )
    return counts


def test_every_worker_refuses_a_revoked_key_from_the_next_postback(tmp_path: Path) -> None:
    """``gateway serve --workers 2``: both workers cache kochava's keys (refusing a wrong key);
    a key made by ``gateway keys create`` is then accepted by each worker from the first
    postback; once ``gateway keys revoke`` returns, every postback with it, to each worker, is
    refused. Each postback goes on a fresh connection, so either worker may take it; they are
    sent until each worker has answered some."""
    gateway = start_gateway(tmp_path, workers=2)
    try:
        deadline = time.monotonic() + 30
        while gateway.log_text().count("Application startup complete") < 2:
            assert time.monotonic() < deadline, gateway.log_text()
            time.sleep(0.1)
        url = f"{gateway.base_url}/partners/kochava/postback"
        payload = json.loads(kochava_samples()["install_ios_attributed.json"])
        data_dir = tmp_path / "data"

        def send_until_both_workers_answer(key: str, outcome: str, status: int) -> Counter[int]:
            before = served(data_dir, outcome)
            statuses: Counter[int] = Counter()
            for _ in range(400):
                body = {**payload, "transaction_id": f"t-{uuid.uuid4().hex}"}
                with httpx.Client(timeout=10) as fresh:
                    response = fresh.post(url, json=body, headers={"X-Api-Key": key})
                statuses[response.status_code] += 1
                assert response.status_code == status, (outcome, statuses, response.text)
                now = served(data_dir, outcome)
                if len(now) == 2 and all(now[f] > before.get(f, 0) for f in now):
                    return statuses
            raise AssertionError(f"one worker never answered: {served(data_dir, outcome)}")

        send_until_both_workers_answer("gwk_wrong", "unauthorized", 401)
        created = gateway.cli("keys", "create", "kochava")
        assert created.returncode == 0, created.stderr
        key_id = created.stdout.split("Created key ")[1].split()[0]
        key = created.stdout.strip().splitlines()[-1]
        send_until_both_workers_answer(key, "accepted", 202)
        revoked = gateway.cli("keys", "revoke", key_id)
        assert revoked.returncode == 0, revoked.stderr
        send_until_both_workers_answer(key, "unauthorized", 401)
    finally:
        stop_gateway(gateway)
