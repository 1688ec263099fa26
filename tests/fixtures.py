"""Fixtures: the real app over real storage (SQLite in a temporary folder, or PostgreSQL) and a
real status store (the embedded one, or the Redis server on 127.0.0.1:6379), plus a real gateway
process started with ``gateway serve`` for the tests that need true concurrency."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.config import Config, PartnerConfig, load_config
from gateway.keys import create_key, key_secret
from gateway.storage import open_storage

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_TOKEN = "test-admin-token"


# What install_ios_attributed.json must become, whatever way it arrives.
IOS_FIELDS: dict[str, Any] = {
    "partner": "kochava",
    "kind": "install",
    "event_name": "install",
    "attributed": True,
    "source": "FakeNetwork Ads",
    "source_id": "9999",
    "campaign": "spring_launch_us",
    "campaign_id": "kofakeapp-ios-cmp-0001",
    "adgroup": "pub_123",
    "adgroup_id": "pub_123",
    "ad": "banner_320x50_v2",
    "ad_id": "banner_320x50_v2",
    "platform": "ios",
    "app_id": "com.example.fakeapp",
    "idfa": "11111111-2222-4AAA-8BBB-333333333333",
    "idfv": "44444444-5555-4CCC-8DDD-666666666666",
    "google_ad_id": None,
    "android_id": None,
    "windows_ad_id": None,
    "braze_id": None,
    "external_id": None,
    "partner_device_id": "KIFAKE00000000000000000000000000000000000001",
    "revenue": None,
    "currency": None,
    "country": "US",
    "dedupe_key": "fake-txn-0001",
}


def kochava_samples() -> dict[str, bytes]:
    folder = ROOT / "plugins" / "kochava" / "samples"
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.json"))}


def make_config(data_dir: Path, redis_prefix: str | None = None, **partners: bool) -> Config:
    """The embedded defaults, with storage and status under ``data_dir``."""
    config = load_config(path=ROOT / "config" / "gateway.toml", env={})
    config.data_dir = str(data_dir)
    config.storage.url = f"sqlite:///{data_dir}/gateway.db"
    config.admin_token = ADMIN_TOKEN
    if redis_prefix is not None:
        config.status.redis_url = REDIS_URL
        config.status.key_prefix = redis_prefix
    for name, enabled in partners.items():
        config.partners[name] = PartnerConfig(enabled=enabled)
    return config


def new_key(config: Config, partner: str = "kochava") -> str:
    async def run() -> str:
        storage = open_storage(config.storage.url)
        await storage.open()
        try:
            return (await create_key(storage, partner, key_secret(config)))[1]
        finally:
            await storage.close()

    return asyncio.run(run())


@pytest.fixture(autouse=True)
def no_external_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never load third-party partners that happen to be installed: only those a test
    allows itself."""
    monkeypatch.delenv("GATEWAY_PLUGINS", raising=False)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A private key prefix on the real Redis server, deleted afterwards."""
    prefix = f"gwtest:{uuid.uuid4().hex}:"
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()  # no Redis is a failure, not a skip
    yield prefix
    for key in client.scan_iter(match=prefix + "*"):
        client.delete(key)
    client.close()


@pytest.fixture(params=["embedded", "redis"])
def status_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def config(tmp_path: Path, request: pytest.FixtureRequest) -> Config:
    """Embedded defaults in a temporary folder; Redis status when the test asks for
    ``status_backend`` and it is "redis"."""
    prefix = None
    if "status_backend" in request.fixturenames:
        if request.getfixturevalue("status_backend") == "redis":
            prefix = request.getfixturevalue("redis_prefix")
    return make_config(tmp_path / "data", prefix)


@pytest.fixture
def client(config: Config) -> Iterator[TestClient[Any]]:
    with TestClient(create_app(config)) as test_client:
        yield test_client


@pytest.fixture
def api_key(config: Config) -> str:
    return new_key(config)


@pytest.fixture
def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveGateway(msgspec.Struct):
    base_url: str
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log_path: Path

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def create_key(self, partner: str = "kochava") -> str:
        done = self.cli("keys", "create", partner)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8")


def start_gateway(
    tmp_path: Path, extra_env: dict[str, str] | None = None, workers: int | None = None
) -> LiveGateway:
    """``gateway serve`` on a free port, its output in ``tmp_path/gateway.log``; ``workers``
    adds ``--workers N``."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        {
            "GATEWAY_CONFIG": str(ROOT / "config" / "gateway.toml"),
            "GATEWAY_DATA_DIR": str(tmp_path / "data"),
            "GATEWAY_STORAGE_URL": f"sqlite:///{tmp_path}/data/gateway.db",
            "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
        }
    )
    env.update(extra_env or {})
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--port", str(port)]
            + (["--workers", str(workers)] if workers is not None else []),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    gateway = LiveGateway(f"http://127.0.0.1:{port}", env, process, log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited at start:\n{gateway.log_text()}")
        try:
            if httpx.get(gateway.base_url + "/healthz", timeout=1).status_code == 200:
                return gateway
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"gateway did not start:\n{gateway.log_text()}")


def stop_gateway(gateway: LiveGateway) -> None:
    gateway.process.terminate()
    try:
        gateway.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        gateway.process.kill()
        gateway.process.wait()


@pytest.fixture
def live_gateway(tmp_path: Path) -> Iterator[LiveGateway]:
    gateway = start_gateway(tmp_path)
    yield gateway
    stop_gateway(gateway)
