"""Security (docs/security.md): partner keys stored only as keyed hashes (HMAC-SHA256 with a
server secret), never written to storage, logs or raw payloads, nor echoed in error bodies;
admin endpoints and the partners page refuse missing or wrong credentials."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import sqlite3
import stat
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import psycopg
import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.config import Config, ConfigError, load_config
from gateway.keys import hash_key, key_secret, legacy_hash, secret_id
from gateway.storage import KeyRecord, open_storage
from tests.fixtures import (
    ADMIN_TOKEN,
    ROOT,
    kochava_samples,
    make_config,
    new_key,
    start_gateway,
    stop_gateway,
)
from tests.test_storage import postgres_database

INSTALL = json.loads(kochava_samples()["install_ios_attributed.json"])
POSTBACK = "/partners/kochava/postback"
SECRET_A = "secret-a-" + "a" * 40
SECRET_B = "secret-b-" + "b" * 40


def install(n: int | str, **extra: Any) -> dict[str, Any]:
    return {**INSTALL, "transaction_id": f"sec-{n}", **extra}


def stored_hashes(config: Config) -> list[str]:
    db = Path(config.storage.url.removeprefix("sqlite:///"))
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT key_hash FROM api_keys")]


# -- keyed hashes --------------------------------------------------------------------------------


def test_the_stored_hash_is_keyed_with_the_server_secret_not_a_plain_sha256(
    config: Config,
) -> None:
    key = new_key(config)
    (stored,) = stored_hashes(config)
    assert stored != hashlib.sha256(key.encode()).hexdigest()
    assert hashlib.sha256(key.encode()).hexdigest() not in stored
    assert key not in stored
    # Generated once into the data folder, private to its owner, and the HMAC key of the hash.
    secret_file = Path(config.data_dir) / "key-secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    secret = secret_file.read_text().strip().encode()
    assert len(secret) >= 32
    digest = hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()
    assert stored == f"hmac-sha256:{secret_id(secret)}:{digest}"
    assert key_secret(config) == secret  # the same secret on every later read


def test_a_different_secret_refuses_the_key_and_says_why_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path / "data")
    config.key_secret = SECRET_A
    key = new_key(config)
    other = make_config(tmp_path / "data")
    other.key_secret = SECRET_B  # e.g. a second host started without GATEWAY_KEY_SECRET
    with (
        caplog.at_level(logging.ERROR, logger="gateway.keys"),
        TestClient(create_app(other)) as client,
    ):
        for n in range(3):
            response = client.post(POSTBACK, params={"api_key": key}, json=install(n))
            assert response.status_code == 401, response.text
    reports = [r.getMessage() for r in caplog.records if "another key secret" in r.getMessage()]
    assert len(reports) == 1, reports  # once per process, not once per request
    assert secret_id(SECRET_A.encode()) in reports[0]
    assert SECRET_A not in caplog.text and SECRET_B not in caplog.text
    with TestClient(create_app(config)) as client:  # the right secret takes it
        response = client.post(POSTBACK, params={"api_key": key}, json=install(0))
        assert response.status_code == 202


def test_the_secret_comes_from_GATEWAY_KEY_SECRET_before_the_file(tmp_path: Path) -> None:
    env = {"GATEWAY_DATA_DIR": str(tmp_path), "GATEWAY_KEY_SECRET": f"  {SECRET_A}\n"}
    config = load_config(ROOT / "config" / "gateway.toml", env=env)
    assert key_secret(config) == SECRET_A.encode()
    assert not (tmp_path / "key-secret").exists()
    with pytest.raises(ConfigError, match="at least 32 characters"):
        load_config(ROOT / "config" / "gateway.toml", env={"GATEWAY_KEY_SECRET": "short"})


def test_a_key_hashed_by_an_earlier_version_works_and_is_rehashed_on_first_use(
    config: Config,
) -> None:
    key = "gwk_" + uuid.uuid4().hex + uuid.uuid4().hex

    async def add_legacy() -> None:
        storage = open_storage(config.storage.url)
        await storage.open()
        try:
            record = KeyRecord(
                key_id="key_0ld0ld", partner="kochava", hint=key[-4:], created_at=datetime.now(UTC)
            )
            await storage.add_key(record, legacy_hash(key))
        finally:
            await storage.close()

    asyncio.run(add_legacy())
    assert stored_hashes(config) == [hashlib.sha256(key.encode()).hexdigest()]
    with TestClient(create_app(config)) as client:
        assert client.post(POSTBACK, params={"api_key": key}, json=install(0)).status_code == 202
        assert stored_hashes(config) == [hash_key(key, key_secret(config))]
        assert client.post(POSTBACK, params={"api_key": key}, json=install(1)).status_code == 202
        wrong = client.post(POSTBACK, params={"api_key": key + "x"}, json=install(2))
        assert wrong.status_code == 401


# -- the key is never written anywhere -----------------------------------------------------------


def send_every_way(client: httpx.Client | TestClient[Any], key: str) -> list[httpx.Response]:
    """The key in every place a partner may send it, with answers 2xx, 4xx and 429."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    wrong = key[:-4] + "XXXX"  # close to the key: must not be written either
    out = [
        client.post(POSTBACK, params={"api_key": key}, json=install(1)),
        client.post(POSTBACK, headers={"Authorization": f"Bearer {key}"}, json=install(2)),
        client.post(POSTBACK, headers={"X-Api-Key": key}, json=install(3)),
        client.post(POSTBACK, json=install(4, api_key=key)),
        client.post(POSTBACK, content=urlencode(install(5, api_key=key)), headers=form),
        client.post(POSTBACK, json=[install(6, api_key=key), install(7, api_key=key)]),
        client.get(POSTBACK, params={**install(8), "api_key": key}),
        client.post(POSTBACK, params={"api_key": key}, json=install(1)),  # duplicate
        client.post(POSTBACK, params={"api_key": key}, content=b"{broken"),  # 400
        client.post(POSTBACK, params={"api_key": key}, json={"api_key": key}),  # 422
        client.post(POSTBACK, json=[install(9, api_key=key), install(10, api_key=wrong)]),  # 401
        client.post(POSTBACK, params={"api_key": wrong}, json=install(11)),  # 401
        client.post(POSTBACK, headers={"Authorization": f"Bearer {wrong}"}, json=install(12)),
    ]
    codes = [r.status_code for r in out]
    assert codes == [202, 202, 202, 202, 202, 202, 202, 200, 400, 422, 401, 401, 401], codes
    out += [client.post(POSTBACK, params={"api_key": key}, json=install(n)) for n in range(13, 20)]
    # 10 of the 15 requests of the window used above (a 401 uses none): 5 more, then 429.
    assert [r.status_code for r in out[-7:]] == [202, 202, 202, 202, 202, 429, 429]
    for response in out:
        assert key not in response.text and wrong not in response.text, response.text
        assert key not in str(response.headers)
    return out


def assert_no_key_in_raw(events: list[dict[str, Any]], key: str) -> None:
    assert len(events) == 13
    for event in events:
        assert "api_key" not in event["raw"]
        assert key not in json.dumps(event)


@pytest.fixture
def limited_config_file(tmp_path: Path) -> Path:
    text = (ROOT / "config" / "gateway.toml").read_text(encoding="utf-8")
    path = tmp_path / "gateway.toml"
    path.write_text(text.replace("rate_per_key = 0", "rate_per_key = 15"), encoding="utf-8")
    return path


def test_the_key_is_never_in_the_database_files_logs_or_raw_payloads(
    tmp_path: Path, limited_config_file: Path
) -> None:
    gateway = start_gateway(tmp_path, {"GATEWAY_CONFIG": str(limited_config_file)})
    try:
        key = gateway.create_key()
        with httpx.Client(base_url=gateway.base_url, timeout=10) as client:
            send_every_way(client, key)
            admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            events = client.get("/events", params={"limit": 100}, headers=admin).json()["events"]
            metrics = client.get("/metrics").text
    finally:
        stop_gateway(gateway)
    assert_no_key_in_raw(events, key)
    assert key not in metrics
    files = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"gateway.db", "status.db", "key-secret"} <= names, names
    for path in files:  # gateway.db and its WAL, status.db, the secrets, metrics files
        assert key.encode() not in path.read_bytes(), path
    log = gateway.log_text()
    assert '"status": 202' in log and '"status": 429' in log  # the requests were logged
    assert key not in log and key[4:] not in log
    secret = (tmp_path / "data" / "key-secret").read_text().strip()
    assert secret not in log
    assert gateway.cli("keys", "list").stdout.count(key[-4:]) == 1  # only the masked hint


def test_the_key_is_never_in_postgresql_or_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with postgres_database() as url:
        config = make_config(tmp_path / "data")
        config.storage.url = url
        config.limits.rate_per_key = 15
        key = new_key(config)
        with caplog.at_level(logging.DEBUG), TestClient(create_app(config)) as client:
            send_every_way(client, key)
            admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            events = client.get("/events", params={"limit": 100}, headers=admin).json()["events"]
        assert_no_key_in_raw(events, key)
        with psycopg.connect(url) as conn:
            rows = conn.execute(
                "SELECT t::text FROM events t UNION ALL SELECT t::text FROM api_keys t"
            ).fetchall()
            bodies = conn.execute("SELECT body FROM events").fetchall()
        assert len(rows) == 14  # 13 events and the key
        for (row,) in rows:
            assert key not in row
        for (body,) in bodies:
            assert key.encode() not in bytes(body)
    # Every record the server side wrote (the test's own HTTP client logs its URLs: not ours).
    server = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    messages = [r.getMessage() + json.dumps(vars(r), default=str) for r in server]
    assert any('"status": 429' in m for m in messages)
    assert not [m for m in messages if key in m]


# -- admin endpoints and the partners page -------------------------------------------------------

#: Routes open to anyone, by decision (docs/security.md): the postback route (its key is checked
#: inside), liveness, readiness and metrics (serve them on an internal listener), the sign-in
#: form, sign-out (it only clears a cookie), the page's static assets, and the OpenAPI schema.
OPEN = {
    "/partners/{partner:str}/postback",
    "/healthz",
    "/readyz",
    "/metrics",
    "/login",
    "/logout",
    "/ui/assets/{name:str}",
}
OPEN_PREFIXES = ("/schema",)


def concrete(path: str) -> str:
    return (
        path.replace("{partner:str}", "kochava")
        .replace("{key_id:str}", "key_0123abcd")
        .replace("{name:str}", "page.css")
        .replace("{path:str}", "x")
    )


def guarded_routes(config: Config) -> list[tuple[str, str]]:
    """(method, path) of every route that is not open, OPTIONS aside."""
    out = []
    for route in create_app(config).routes:
        if route.path in OPEN or route.path.startswith(OPEN_PREFIXES):
            continue
        for handler in getattr(route, "route_handlers", []):
            for method in sorted(handler.http_methods - {"OPTIONS"}):
                out.append((method, route.path))
    return out


def test_the_guarded_routes_are_the_admin_api_and_the_partners_page(config: Config) -> None:
    assert sorted(guarded_routes(config)) == [
        ("GET", "/events"),
        ("GET", "/partners"),
        ("GET", "/partners/{partner:str}/status"),
        ("GET", "/ui"),
        ("GET", "/ui/cards"),
        ("POST", "/ui/partners/{partner:str}/enabled"),
        ("POST", "/ui/partners/{partner:str}/keys"),
        ("POST", "/ui/partners/{partner:str}/keys/{key_id:str}/revoke"),
    ]


@pytest.fixture
def app_client(config: Config) -> Iterator[TestClient[Any]]:
    with TestClient(create_app(config), base_url="https://gateway.test") as client:
        yield client


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer wrong", f"Bearer {ADMIN_TOKEN}x", f"Basic {ADMIN_TOKEN}"],
)
def test_every_route_that_is_not_open_refuses_missing_or_wrong_credentials(
    config: Config, app_client: TestClient[Any], authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    key = new_key(config)  # a partner key is no admin credential either
    for credentials in (headers, {"Authorization": f"Bearer {key}"}, {"X-Api-Key": key}):
        for method, path in guarded_routes(config):
            response = app_client.request(
                method, concrete(path), headers=credentials, follow_redirects=False
            )
            if path.startswith("/ui"):  # the page: a session, never a header
                assert response.status_code in (303, 401), (method, path, response.status_code)
                if response.status_code == 303:
                    assert response.headers["location"] == "/login"
            else:
                assert response.status_code == 401, (method, path, response.text)
                assert response.json()["error"] == "unauthorized"
    # Nothing was done: no key created, no partner switched off.
    assert len(stored_hashes(config)) == 1
    assert app_client.get("/partners", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()


def test_the_admin_token_is_no_session_for_the_partners_page(
    config: Config, app_client: TestClient[Any]
) -> None:
    bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for method, path in guarded_routes(config):
        response = app_client.request(
            method, concrete(path), headers=bearer, follow_redirects=False
        )
        if path.startswith("/ui"):
            assert response.status_code in (303, 401), (method, path)
        else:
            assert response.status_code in (200, 404), (method, path, response.text)


def test_open_observability_endpoints_show_no_secrets_or_hosts(
    config: Config, app_client: TestClient[Any]
) -> None:
    key = new_key(config)
    assert app_client.post(POSTBACK, params={"api_key": key}, json=install(0)).status_code == 202
    texts = [app_client.get(path).text for path in ("/metrics", "/readyz", "/healthz")]
    for text in texts:
        assert key not in text and ADMIN_TOKEN not in text
        assert "key_" not in text  # no key ids either
        assert config.data_dir not in text and "sqlite" not in text


# -- what partners are told ----------------------------------------------------------------------


def test_error_bodies_carry_only_the_code_reason_and_field(config: Config) -> None:
    key = new_key(config)
    config.limits.rate_per_key = 2
    with TestClient(create_app(config)) as client:
        answers = [
            client.post(POSTBACK, json=install(0)),  # 401 missing
            client.post(POSTBACK, params={"api_key": "gwk_guess"}, json=install(0)),  # 401
            client.post("/partners/nope/postback", json=install(0)),  # 404
            client.post(POSTBACK, params={"api_key": key}, content=b"[1,"),  # 400
            client.post(POSTBACK, params={"api_key": key}, json={"x": 1}),  # 422
            client.post(POSTBACK, params={"api_key": key}, json=install(0)),  # 429
        ]
    assert [a.status_code for a in answers] == [401, 401, 404, 400, 422, 429]
    for answer in answers:
        body = answer.json()
        assert set(body) <= {"status", "error", "reason", "field"}, body
        assert "gwk_guess" not in answer.text and key not in answer.text
        assert config.data_dir not in answer.text
