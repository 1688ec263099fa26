"""Publishing accepted events to a Redis Stream, at least once (gateway/publish/), over both
storage backends: published after the answer, kept in the outbox while Redis is down and
published when it is back, one publisher at a time per database, and the consumer example
(examples/stream_consumer.py) taking each event once.

Redis is the server at GATEWAY_TEST_REDIS_URL under a private key prefix, or a redis-server of
the test's own on a free port when the test stops and starts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import msgspec
import pytest
import redis
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.config import PUBLISH_ENGINES, Config, ConfigError, load_config
from gateway.errors import StorageUnavailable
from gateway.events import AttributionEvent
from gateway.metrics import Metrics
from gateway.publish import ENGINES, publish_settings
from gateway.publish.outbox import open_outbox
from gateway.publish.redis_stream import RedisStreamPublisher
from gateway.publish.relay import LEASE, OutboxRelay
from gateway.storage import open_storage
from tests.fixtures import (
    ADMIN_TOKEN,
    REDIS_URL,
    ROOT,
    free_port,
    kochava_samples,
    make_config,
    new_key,
    start_gateway,
    stop_gateway,
)
from tests.test_storage import postgres_database

T = TypeVar("T")

SAMPLES = kochava_samples()
POSTBACK = "/partners/kochava/postback"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CONSUMER = ROOT / "examples" / "stream_consumer.py"

#: Longest a test waits for the publisher. It publishes within about 0.2 s when all is well;
#: after Redis comes back, within its backoff (at most 10 s). Generous for a loaded CI machine.
WAIT_S = 30.0


# -- helpers ------------------------------------------------------------------------------------


def install(n: int) -> bytes:
    """An attributed Kochava install with its own dedupe key (transaction id)."""
    payload = json.loads(SAMPLES["install_ios_attributed.json"])
    payload["transaction_id"] = f"txn-publish-{n}"
    return json.dumps(payload).encode()


def wait_until(check: Callable[[], T | None], what: str, timeout: float = WAIT_S) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def entries(client: redis.Redis, stream: str) -> list[tuple[str, dict[str, str]]]:
    return [
        (i.decode(), {k.decode(): v.decode() for k, v in fields.items()})
        for i, fields in client.xrange(stream)
    ]


def stream_ids(client: redis.Redis, stream: str, n: int) -> list[str]:
    """The event ids in the stream once it has at least ``n`` entries."""
    wait_until(lambda: client.xlen(stream) >= n, f"{n} entries in {stream}")
    return [fields["event_id"] for _, fields in entries(client, stream)]


def outbox_count(url: str) -> int:
    async def run() -> int:
        outbox = open_outbox(url)
        await outbox.open()
        try:
            return await outbox.count()
        finally:
            await outbox.close()

    return asyncio.run(run())


def publish_config(
    tmp_path: Path, storage_url: str, redis_url: str, stream: str, **publish: Any
) -> Config:
    """Embedded status store; events published to ``stream`` on ``redis_url``."""
    config = make_config(tmp_path / "data")
    config.storage.url = storage_url
    config.publish = msgspec.structs.replace(
        config.publish, engine="redis-stream", redis_url=redis_url, stream=stream, **publish
    )
    return config


def post(client: TestClient[Any], key: str, body: bytes, expect: int = 202) -> dict[str, Any]:
    response = client.post(POSTBACK, params={"api_key": key}, content=body)
    assert response.status_code == expect, response.text
    answer: dict[str, Any] = response.json()
    return answer


class RedisServer:
    """A redis-server of the test's own, without persistence: stopped, it forgets everything."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.folder)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)

        def up() -> bool:
            with contextlib.suppress(redis.RedisError):
                return bool(client.ping())
            return False

        wait_until(up, f"redis-server on port {self.port} answers", timeout=15)
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=15)
            self.process = None


@pytest.fixture(params=["sqlite", "postgres"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/data/gateway.db"
    else:
        with postgres_database() as url:
            yield url


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def shared_redis() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


# -- publishing after the answer -----------------------------------------------------------------


def test_accepted_events_are_published_once_in_order(
    storage_url: str, tmp_path: Path, redis_prefix: str, shared_redis: redis.Redis
) -> None:
    stream = f"{redis_prefix}events"
    config = publish_config(tmp_path, storage_url, REDIS_URL, stream)
    key = new_key(config)
    with TestClient(create_app(config)) as client:
        first = post(client, key, install(1))
        duplicate = post(client, key, install(1), expect=200)
        assert duplicate == {"status": "duplicate", "event_id": first["event_id"]}
        organic = post(client, key, SAMPLES["install_organic.json"], expect=200)
        assert organic["status"] == "ignored"
        batch = post(client, key, b"[" + install(2) + b"," + install(3) + b"]")
        later = [r["event_id"] for r in batch["results"]]

        ids = stream_ids(shared_redis, stream, 3)
        stored = client.get("/events", params={"limit": 10}, headers=ADMIN).json()["events"]
        wait_until(
            lambda: "gateway_published_events_total 3.0" in client.get("/metrics").text,
            "the published events counted",
        )

    # Stored order, each once; the duplicate and the organic install are not published.
    assert ids == [first["event_id"], *later]
    by_id = {event["event_id"]: event for event in stored}
    for _, fields in entries(shared_redis, stream):
        assert json.loads(fields["event"]) == by_id[fields["event_id"]]
        assert (fields["partner"], fields["kind"]) == ("kochava", "install")
    assert outbox_count(storage_url) == 0


def test_events_accepted_while_redis_is_down_are_published_when_it_is_back(
    storage_url: str, tmp_path: Path, own_redis: RedisServer
) -> None:
    stream = "gateway:events"
    config = publish_config(tmp_path, storage_url, own_redis.url, stream)
    key = new_key(config)
    own_redis.start()
    with TestClient(create_app(config)) as client:
        first = post(client, key, install(1))
        client_redis = redis.Redis.from_url(own_redis.url)
        assert stream_ids(client_redis, stream, 1) == [first["event_id"]]
        client_redis.close()

        own_redis.stop()  # and with it, the stream (no persistence)
        accepted = [post(client, key, install(n))["event_id"] for n in range(2, 6)]
        # Answered 202 while Redis is down: they wait in the outbox.
        wait_until(
            lambda: "gateway_publish_errors_total 0.0" not in client.get("/metrics").text,
            "a failed publishing round",
        )
        assert outbox_count(storage_url) == len(accepted)

        own_redis.start()
        client_redis = redis.Redis.from_url(own_redis.url)
        assert stream_ids(client_redis, stream, len(accepted)) == accepted
        wait_until(lambda: outbox_count(storage_url) == 0, "the outbox emptied")
        client_redis.close()


def test_publishing_is_off_without_redis_and_follows_the_config(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data")  # embedded defaults: no Redis anywhere
    assert config.publish.engine == "auto"
    assert publish_settings(config) is None
    key = new_key(config)
    with TestClient(create_app(config)) as client:
        post(client, key, install(1))

    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "gateway.db")) as db:
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    assert "events" in names
    assert not names & {"event_outbox", "event_outbox_add"}  # nothing installed when off

    # "auto" publishes when the status store is Redis, to <key_prefix>events by default.
    config.status.redis_url = REDIS_URL
    config.status.key_prefix = "acme:"
    settings = publish_settings(config)
    assert settings is not None
    assert (settings.engine, settings.redis_url, settings.stream) == (
        "redis-stream",
        REDIS_URL,
        "acme:events",
    )
    config.publish.engine = "none"
    assert publish_settings(config) is None

    # An engine is named in config; every name but auto/none has an implementation.
    assert set(ENGINES) == set(PUBLISH_ENGINES) - {"auto", "none"}
    config.status.redis_url = ""
    config.publish.engine = "redis-stream"
    with pytest.raises(ConfigError, match=r"needs publish\.redis_url"):
        publish_settings(config)
    toml = tmp_path / "bad.toml"
    for table, message in [
        ('engine = "kafka"', "publish.engine must be one of"),
        ('redis_url = "http://x"', "publish.redis_url must be"),
        ("maxlen = -1", "publish.maxlen"),
        ("batch_size = 0", "publish.batch_size"),
    ]:
        toml.write_text(f"[publish]\n{table}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(toml, env={})
    # The Redis URL may come from the environment, read after the file.
    toml.write_text('[publish]\nengine = "redis-stream"\n')
    with pytest.raises(ConfigError, match="GATEWAY_REDIS_URL"):
        load_config(toml, env={})
    from_env = load_config(toml, env={"GATEWAY_REDIS_URL": REDIS_URL})
    assert publish_settings(from_env) is not None


# -- one publisher per database ------------------------------------------------------------------


def test_two_publishers_on_one_database_publish_each_event_once_and_take_over(
    storage_url: str, redis_prefix: str, shared_redis: redis.Redis
) -> None:
    """Two relays (as in two processes) on one outbox: one publishes at a time, so each event
    reaches the stream once and in storage order; when it stops, the other takes over."""
    stream = f"{redis_prefix}events"

    def events(start: int, n: int) -> list[AttributionEvent]:
        return [
            AttributionEvent(
                kind="install",
                attributed=True,
                partner="kochava",
                event_id=f"evt-{i:04d}",
                dedupe_key=f"key-{i}",
            )
            for i in range(start, start + n)
        ]

    async def run() -> tuple[list[str], list[str], str]:
        storage = open_storage(storage_url)
        await storage.open()
        relays = []
        for _ in range(2):
            outbox = open_outbox(storage_url)
            await outbox.open()
            publisher = RedisStreamPublisher(REDIS_URL, stream)
            await publisher.open()
            relays.append(OutboxRelay(outbox, publisher, Metrics(), batch_size=40))
        for relay in relays:
            relay.start()
        try:
            for start in range(0, 300, 30):  # stored while both relays run
                await storage.store(events(start, 30))
            await until(lambda: shared_redis.xlen(stream) >= 300)
            leader = await relays[0].outbox.lease_holder(LEASE)
            first = [f[b"event_id"].decode() for _, f in shared_redis.xrange(stream)]

            stopping = next(r for r in relays if r.holder == leader)
            other = next(r for r in relays if r is not stopping)
            await stopping.stop()  # lets the lease go: the other takes it within a second
            await storage.store(events(300, 20))
            await until(lambda: shared_redis.xlen(stream) >= 320)
            second = [f[b"event_id"].decode() for _, f in shared_redis.xrange(stream)]
            assert await other.outbox.lease_holder(LEASE) == other.holder
            return first, second, str(leader)
        finally:
            for relay in relays:
                await relay.stop()
                await relay.publisher.close()
                await relay.outbox.close()
            await storage.close()

    first, second, leader = asyncio.run(run())
    assert first == [f"evt-{i:04d}" for i in range(300)]
    assert second == [f"evt-{i:04d}" for i in range(320)]
    assert leader  # somebody held the lease while publishing
    assert outbox_count(storage_url) == 0


async def until(check: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(0.05)


def test_an_outbox_that_cannot_be_reached_is_storage_unavailable(tmp_path: Path) -> None:
    async def run() -> None:
        outbox = open_outbox(f"postgresql://postgres@127.0.0.1:{free_port()}/none")
        with pytest.raises(StorageUnavailable, match="outbox"):
            await outbox.open()

    asyncio.run(run())


# -- the consumer example ------------------------------------------------------------------------


def run_consumer(stream: str, sink: Path, *extra: str) -> dict[str, int]:
    done = subprocess.run(
        [
            *(sys.executable, str(CONSUMER), "--redis-url", REDIS_URL, "--stream", stream),
            *("--group", "warehouse", "--sink", str(sink), "--until-idle", "1", *extra),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    counts: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    return counts


def test_the_consumer_example_takes_each_event_once(
    tmp_path: Path, redis_prefix: str, shared_redis: redis.Redis
) -> None:
    stream = f"{redis_prefix}events"
    config = publish_config(tmp_path, f"sqlite:///{tmp_path}/data/gateway.db", REDIS_URL, stream)
    key = new_key(config)
    with TestClient(create_app(config)) as client:
        accepted = [post(client, key, install(n))["event_id"] for n in range(8)]
        assert stream_ids(shared_redis, stream, 8) == accepted

    # At least once: a publisher that stopped before noting a batch publishes it again.
    for _, fields in shared_redis.xrange(stream, count=3):
        shared_redis.xadd(stream, fields)
    sink = tmp_path / "consumed.db"

    # A consumer takes two entries and dies before acknowledging them.
    shared_redis.xgroup_create(stream, "warehouse", id="0")
    shared_redis.xreadgroup("warehouse", "dead", {stream: ">"}, count=2)
    time.sleep(0.3)

    counts = run_consumer(stream, sink, "--consumer", "c1", "--claim-idle-ms", "200")
    assert counts == {
        "processed": 8,
        "duplicates": 3,
        "claimed": 2,
        "malformed": 0,
        "trimmed": 0,
    }
    assert shared_redis.xpending(stream, "warehouse")["pending"] == 0

    with contextlib.closing(sqlite3.connect(sink)) as db:
        rows = db.execute("SELECT event_id, event FROM consumed").fetchall()
    assert sorted(r[0] for r in rows) == sorted(accepted)
    assert all(json.loads(event)["partner"] == "kochava" for _, event in rows)

    # Run again: nothing new, nothing taken twice.
    again = run_consumer(stream, sink, "--consumer", "c2")
    assert set(again.values()) == {0}


# -- a publisher that dies -----------------------------------------------------------------------


def lease_holder_pid(url: str) -> int | None:
    async def run() -> str | None:
        outbox = open_outbox(url)
        await outbox.open()
        try:
            return await outbox.lease_holder(LEASE)
        finally:
            await outbox.close()

    holder = asyncio.run(run())
    return int(holder.split(":")[1]) if holder else None  # host:pid:random


def test_when_the_publishing_process_dies_another_takes_over(
    tmp_path: Path, redis_prefix: str, shared_redis: redis.Redis
) -> None:
    """Two ``gateway serve`` processes on one SQLite file: the one holding the lease is killed
    (SIGKILL: it cannot let the lease go); the other publishes once the lease has expired."""
    stream = f"{redis_prefix}events"
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(
        f'[publish]\nengine = "redis-stream"\nredis_url = "{REDIS_URL}"\n'
        f'stream = "{stream}"\nlease_seconds = 1\n\n[partners.kochava]\nenabled = true\n'
    )
    url = f"sqlite:///{tmp_path}/shared/gateway.db"
    env = {
        "GATEWAY_CONFIG": str(config_file),
        "GATEWAY_STORAGE_URL": url,
        "GATEWAY_KEY_SECRET": "k" * 40,
    }
    for host in ("a", "b"):
        (tmp_path / host).mkdir()
    a = start_gateway(tmp_path / "a", env)
    b = start_gateway(tmp_path / "b", env)
    try:
        key = a.create_key()
        pid = wait_until(lambda: lease_holder_pid(url), "one process holding the lease")
        leader, survivor = (a, b) if pid == a.process.pid else (b, a)
        assert pid == leader.process.pid

        leader.process.kill()
        leader.process.wait(timeout=15)
        accepted = []
        for n in range(5):
            response = httpx.post(
                survivor.base_url + POSTBACK, params={"api_key": key}, content=install(n)
            )
            assert response.status_code == 202, response.text
            accepted.append(response.json()["event_id"])

        assert stream_ids(shared_redis, stream, len(accepted)) == accepted
        assert lease_holder_pid(url) == survivor.process.pid
        assert "this process publishes now" in survivor.log_text()
    finally:
        stop_gateway(a)
        stop_gateway(b)


def test_the_consumer_example_sets_aside_malformed_and_trimmed_entries(
    tmp_path: Path, redis_prefix: str, shared_redis: redis.Redis
) -> None:
    stream = f"{redis_prefix}events"
    event = {"event_id": "e1", "partner": "kochava", "kind": "install"}
    shared_redis.xadd(stream, {"event_id": "e1", "event": json.dumps(event)})
    shared_redis.xgroup_create(stream, "warehouse", id="0")
    shared_redis.xreadgroup("warehouse", "dead", {stream: ">"})  # holds e1 ...
    shared_redis.xtrim(stream, maxlen=0)  # ... which is then trimmed away (maxlen)
    shared_redis.xadd(stream, {"event_id": "e2", "event": "{not json"})
    shared_redis.xadd(stream, {"event_id": "e3", "event": json.dumps({**event, "event_id": "e3"})})
    time.sleep(0.3)

    counts = run_consumer(
        stream, tmp_path / "sink.db", "--consumer", "c1", "--claim-idle-ms", "200"
    )
    assert counts == {"processed": 1, "duplicates": 0, "claimed": 0, "malformed": 1, "trimmed": 1}
    assert shared_redis.xpending(stream, "warehouse")["pending"] == 0
