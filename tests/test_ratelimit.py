"""The per-key rate limit (``[limits] rate_per_key`` per ``rate_window_seconds``): 429 with
``Retry-After`` past the limit, one budget per key, counted only once the key is authenticated,
kept in Redis or in the embedded status file so that it holds across workers and processes."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.config import Config, ConfigError, load_config
from gateway.metrics import MULTIPROC_FOLDER
from gateway.ratelimit import EmbeddedLimiter, RedisLimiter
from tests.fixtures import (
    REDIS_URL,
    ROOT,
    LiveGateway,
    free_port,
    kochava_samples,
    new_key,
    start_gateway,
    stop_gateway,
)

INSTALL = json.loads(kochava_samples()["install_ios_attributed.json"])
ORGANIC = json.loads(kochava_samples()["install_organic.json"])
POSTBACK = "/partners/kochava/postback"
STATUS = "/partners/kochava/status"


def install(n: int | str) -> bytes:
    return json.dumps({**INSTALL, "transaction_id": f"rl-{n}"}).encode()


def post(client: TestClient[Any] | httpx.Client, key: str, body: bytes) -> httpx.Response:
    return client.post(
        POSTBACK,
        params={"api_key": key},
        content=body,
        headers={"Content-Type": "application/json"},
    )


def copy_of(config: Config) -> Config:
    return msgspec.convert(msgspec.to_builtins(config), Config)


def limited(config: Config, per_key: int, window: int = 3600) -> Config:
    config.limits.rate_per_key = per_key
    config.limits.rate_window_seconds = window
    return config


def assert_429(response: httpx.Response) -> int:
    """The exact refusal; returns its Retry-After."""
    assert response.status_code == 429, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["status"] == "error"
    assert body["error"] == "rate_limited"
    retry_after = int(response.headers["retry-after"])
    assert f"retry after {retry_after} s" in body["reason"], body["reason"]
    return retry_after


def counters(client: TestClient[Any], admin: dict[str, str]) -> dict[str, int]:
    response = client.get(STATUS, headers=admin)
    assert response.status_code == 200
    out: dict[str, int] = response.json()["counters"]
    return out


# -- the limit ---------------------------------------------------------------------------------


def test_off_by_default() -> None:
    assert Config().limits.rate_per_key == 0
    assert load_config(ROOT / "config" / "gateway.toml", env={}).limits.rate_per_key == 0


def test_nothing_is_limited_when_off(config: Config, admin: dict[str, str]) -> None:
    key = new_key(config)
    with TestClient(create_app(config)) as client:
        codes = Counter(post(client, key, install(n)).status_code for n in range(40))
    assert codes == {202: 40}


def test_429_after_n_requests_with_retry_after_to_the_end_of_the_window(
    config: Config, status_backend: str, admin: dict[str, str]
) -> None:
    key = new_key(config)
    window = 3600
    with TestClient(create_app(limited(config, 3, window))) as client:
        started = time.monotonic()
        assert [post(client, key, install(n)).status_code for n in range(3)] == [202] * 3
        refused = post(client, key, install(3))
        elapsed = time.monotonic() - started
        retry_after = assert_429(refused)
        # Whole seconds until the window (which began with the first request) ends.
        assert window - math.ceil(elapsed) <= retry_after <= window
        assert "limit of 3 requests per 3600 s" in refused.json()["reason"]
        assert_429(post(client, key, install(3)))  # still refused, and not stored
        events = client.get("/events", params={"partner": "kochava"}, headers=admin).json()
        assert sorted(e["dedupe_key"] for e in events["events"]) == ["rl-0", "rl-1", "rl-2"]
        # Transient for the partner: its own counter, never "rejected".
        moved = {k: v for k, v in counters(client, admin).items() if v}
        assert moved == {"accepted": 3, "rate_limited": 2}
        metrics = client.get("/metrics").text
        assert 'gateway_postbacks_total{outcome="rate_limited",partner="kochava"} 2.0' in metrics


def test_retry_after_follows_the_clock_and_the_window_frees_exactly_at_its_end(
    config: Config,
) -> None:
    key = new_key(config)
    with TestClient(create_app(limited(config, 2, 3600))) as client:
        limiter = client.app.state.gateway.limiter
        assert isinstance(limiter, EmbeddedLimiter)
        t0 = 1_717_243_200.0  # 2024-06-01 12:00:00 UTC
        limiter.clock = lambda: t0
        assert post(client, key, install(0)).status_code == 202
        limiter.clock = lambda: t0 + 10
        assert post(client, key, install(1)).status_code == 202
        limiter.clock = lambda: t0 + 100
        assert assert_429(post(client, key, install(2))) == 3500
        limiter.clock = lambda: t0 + 3599.2
        assert assert_429(post(client, key, install(2))) == 1  # 0.8 s, rounded up
        limiter.clock = lambda: t0 + 3600  # the window has ended: a new one, a new budget
        assert post(client, key, install(2)).status_code == 202
        assert post(client, key, install(3)).status_code == 202
        assert assert_429(post(client, key, install(4))) == 3600


def test_window_expiry_lets_requests_through_again(config: Config, status_backend: str) -> None:
    key = new_key(config)
    with TestClient(create_app(limited(config, 2, 1))) as client:
        first = time.monotonic()
        assert [post(client, key, install(n)).status_code for n in range(2)] == [202, 202]
        assert assert_429(post(client, key, install(2))) == 1
        # Past the end of the window that began with the first request.
        time.sleep(max(0.0, first + 1.2 - time.monotonic()))
        assert post(client, key, install(2)).status_code == 202
        assert post(client, key, install(3)).status_code == 202
        assert_429(post(client, key, install(4)))


def test_a_second_key_of_the_same_partner_has_its_own_budget(
    config: Config, status_backend: str
) -> None:
    old, new = new_key(config), new_key(config)
    other_partner = new_key(config, "appsflyer")
    with TestClient(create_app(limited(config, 2))) as client:
        assert [post(client, old, install(n)).status_code for n in range(2)] == [202, 202]
        assert_429(post(client, old, install(2)))
        assert [post(client, new, install(n)).status_code for n in range(2, 4)] == [202, 202]
        assert_429(post(client, new, install(4)))
        assert_429(post(client, old, install(4)))
        # Another partner's key: its own budget too (a refusal for its payload, not a 429).
        response = client.post(
            "/partners/appsflyer/postback", params={"api_key": other_partner}, json={}
        )
        assert response.status_code == 422


def test_requests_without_a_valid_key_never_use_a_keys_budget(
    config: Config, status_backend: str, admin: dict[str, str]
) -> None:
    key = new_key(config)
    other_partner = new_key(config, "appsflyer")
    with TestClient(create_app(limited(config, 3))) as client:
        for n in range(30):
            assert post(client, f"wrong-{n}", install(n)).status_code == 401
            assert post(client, other_partner, install(n)).status_code == 401  # not kochava's
            assert client.post(POSTBACK, content=install(n)).status_code == 401  # no key at all
        assert [post(client, key, install(n)).status_code for n in range(3)] == [202] * 3
        assert_429(post(client, key, install(3)))
        moved = {k: v for k, v in counters(client, admin).items() if v}
        assert moved == {"accepted": 3, "unauthorized": 90, "rate_limited": 1}


def test_duplicates_organic_refused_and_batched_requests_each_count_once(
    config: Config, admin: dict[str, str]
) -> None:
    """Every authenticated request counts: a retry or an organic install costs the gateway as
    much as a new install, and a leaked key must not replay one event for free."""
    key = new_key(config)
    batch = json.dumps([{**INSTALL, "transaction_id": f"rl-b{n}"} for n in range(5)]).encode()
    with TestClient(create_app(limited(config, 5))) as client:
        assert post(client, key, install(0)).status_code == 202
        assert post(client, key, install(0)).status_code == 200  # duplicate
        assert post(client, key, json.dumps(ORGANIC).encode()).status_code == 200
        assert post(client, key, b"{not json").status_code == 400
        assert post(client, key, batch).status_code == 202  # five events, one request
        assert_429(post(client, key, install(1)))
        moved = {k: v for k, v in counters(client, admin).items() if v}
        assert moved == {
            "accepted": 6,
            "duplicate": 1,
            "ignored_organic": 1,
            "rejected": 1,
            "rate_limited": 1,
        }


def test_a_key_sent_in_the_body_is_limited_too(config: Config) -> None:
    key = new_key(config)
    with TestClient(create_app(limited(config, 1))) as client:
        first = {**INSTALL, "transaction_id": "rl-body-0", "api_key": key}
        second = {**INSTALL, "transaction_id": "rl-body-1", "api_key": key}
        assert client.post(POSTBACK, json=first).status_code == 202
        assert_429(client.post(POSTBACK, json=second))
        assert_429(client.post(POSTBACK, data={**second, "api_key": key}))  # form-encoded


def test_the_limit_follows_a_config_reload(config: Config) -> None:
    key = new_key(config)
    with TestClient(create_app(config)) as client:
        gw = client.app.state.gateway
        assert [post(client, key, install(n)).status_code for n in range(3)] == [202] * 3
        gw.apply_config(limited(copy_of(config), 2))  # as the watcher does
        assert [post(client, key, install(n)).status_code for n in range(3, 5)] == [202] * 2
        assert_429(post(client, key, install(5)))
        gw.apply_config(limited(copy_of(config), 0))
        assert post(client, key, install(5)).status_code == 202


def test_an_unreachable_limit_store_lets_postbacks_through(config: Config) -> None:
    """Counting is bookkeeping like status: a dead Redis must not turn postbacks away."""
    config.status.redis_url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    key = new_key(config)
    with TestClient(create_app(limited(config, 1))) as client:
        assert [post(client, key, install(n)).status_code for n in range(3)] == [202] * 3
        text = client.get("/metrics").text
    errors = [line for line in text.splitlines() if line.startswith("gateway_status_errors_total")]
    assert errors and float(errors[0].split()[-1]) >= 3, errors


@pytest.mark.parametrize(
    ("setting", "value"),
    [("rate_per_key", -1), ("rate_window_seconds", 0), ("rate_window_seconds", 40 * 86400)],
)
def test_bad_limits_are_refused(tmp_path: Path, setting: str, value: int) -> None:
    path = tmp_path / "g.toml"
    path.write_text(f"[limits]\n{setting} = {value}\n")
    with pytest.raises(ConfigError, match=f"limits.{setting}"):
        load_config(path, env={})


# -- the stores, directly ----------------------------------------------------------------------


async def _hits(limiter: EmbeddedLimiter | RedisLimiter, bucket: str, n: int) -> list[int]:
    await limiter.open()
    try:
        return [(await limiter.hit(bucket, 60)).count for _ in range(n)]
    finally:
        await limiter.close()


def test_the_redis_window_is_one_key_with_an_expiry(redis_prefix: str) -> None:
    import asyncio

    limiter = RedisLimiter(REDIS_URL, redis_prefix)
    assert asyncio.run(_hits(limiter, "key_abc", 4)) == [1, 2, 3, 4]
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert client.get(f"{redis_prefix}rate:key_abc") == b"4"
        assert 59_000 < client.pttl(f"{redis_prefix}rate:key_abc") <= 60_000
    finally:
        client.close()


# -- across processes and workers --------------------------------------------------------------


def _config_file(tmp_path: Path, per_key: int, redis_prefix: str | None = None) -> Path:
    text = (ROOT / "config" / "gateway.toml").read_text(encoding="utf-8")
    text = text.replace("rate_per_key = 0", f"rate_per_key = {per_key}")
    if redis_prefix is not None:
        text = text.replace('key_prefix = "gateway:"', f'key_prefix = "{redis_prefix}"')
    path = tmp_path / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _send_all(urls: list[str], bodies: list[bytes]) -> Counter[int]:
    def send(pair: tuple[str, bytes]) -> int:
        with httpx.Client(timeout=10) as fresh:  # a new connection: any worker may take it
            return fresh.post(pair[0], content=pair[1]).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        return Counter(pool.map(send, zip(urls, bodies, strict=True)))


def _two_gateways(tmp_path: Path, env: dict[str, str]) -> tuple[LiveGateway, LiveGateway]:
    a = start_gateway(tmp_path / "a", env)
    try:
        b = start_gateway(tmp_path / "b", env)
    except BaseException:
        stop_gateway(a)
        raise
    return a, b


def test_the_limit_holds_across_two_gateway_processes_sharing_redis(
    tmp_path: Path, redis_prefix: str
) -> None:
    """Two gateways (own data folders, as on two hosts) share Redis, storage and the key
    secret: one budget per key, whichever gateway a request reaches."""
    env = {
        "GATEWAY_CONFIG": str(_config_file(tmp_path, 10, redis_prefix)),
        "GATEWAY_REDIS_URL": REDIS_URL,
        "GATEWAY_STORAGE_URL": f"sqlite:///{tmp_path}/shared.db",
        "GATEWAY_KEY_SECRET": "shared-secret-" + uuid.uuid4().hex,
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = _two_gateways(tmp_path, env)
    try:
        key = a.create_key()
        urls = [
            f"{(a if n % 2 else b).base_url}{POSTBACK}?api_key={key}" for n in range(24)
        ]  # alternating
        codes = _send_all(urls, [install(f"redis-{n}") for n in range(24)])
        assert codes == {202: 10, 429: 14}
        for gateway in (a, b):
            refused = httpx.post(f"{gateway.base_url}{POSTBACK}?api_key={key}", content=install(99))
            retry_after = assert_429(refused)
            assert 3590 <= retry_after <= 3600  # the same window, kept by Redis
    finally:
        stop_gateway(a)
        stop_gateway(b)


def test_the_limit_holds_across_two_gateway_processes_with_the_embedded_store(
    tmp_path: Path,
) -> None:
    env = {
        "GATEWAY_CONFIG": str(_config_file(tmp_path, 10)),
        "GATEWAY_DATA_DIR": str(tmp_path / "shared-data"),
        "GATEWAY_STORAGE_URL": f"sqlite:///{tmp_path}/shared-data/gateway.db",
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = _two_gateways(tmp_path, env)
    try:
        key = a.create_key()
        urls = [f"{(a if n % 2 else b).base_url}{POSTBACK}?api_key={key}" for n in range(24)]
        codes = _send_all(urls, [install(f"emb-{n}") for n in range(24)])
        assert codes == {202: 10, 429: 14}
    finally:
        stop_gateway(a)
        stop_gateway(b)


def test_the_limit_holds_across_workers_with_the_embedded_store(tmp_path: Path) -> None:
    gateway = start_gateway(
        tmp_path, {"GATEWAY_CONFIG": str(_config_file(tmp_path, 15))}, workers=2
    )
    try:
        deadline = time.monotonic() + 30  # the first worker up answers /healthz: wait for both
        while gateway.log_text().count("Application startup complete") < 2:
            assert time.monotonic() < deadline, gateway.log_text()
            time.sleep(0.1)
        key = gateway.create_key()
        url = f"{gateway.base_url}{POSTBACK}?api_key={key}"
        codes = _send_all([url] * 40, [install(f"w-{n}") for n in range(40)])
        assert codes == {202: 15, 429: 25}
        # Both workers answered postbacks (each writes its own metrics file), so the budget
        # that ran out was one budget shared by the two.
        files = list((tmp_path / "data" / MULTIPROC_FOLDER).glob("counter_*.db"))
        assert len(files) == 2, files
    finally:
        stop_gateway(gateway)
