"""Configuration: the shipped file equals the embedded defaults; environment overrides; errors."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.config import Config, ConfigError, admin_token, load_config
from tests.fixtures import ROOT, make_config, new_key


def test_shipped_config_is_the_embedded_defaults() -> None:
    """Apart from partners you add to it yourself, the shipped file is the embedded defaults."""
    shipped = load_config(ROOT / "config" / "gateway.toml", env={})
    defaults = Config()
    assert msgspec.structs.replace(shipped, partners={}) == msgspec.structs.replace(
        defaults, partners={}
    )
    assert {n: p for n, p in shipped.partners.items() if n in defaults.partners} == (
        defaults.partners
    )


def test_a_config_file_without_partners_enables_none(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text("\ufeff# nothing but a comment, after a byte-order mark\n")
    config = load_config(env={"GATEWAY_CONFIG": str(path)})
    assert config.partners == {}
    assert not config.partner_enabled("kochava")


def test_production_example_parses() -> None:
    config = load_config(ROOT / "config" / "production.example.toml", env={})
    assert config.storage.url.startswith("postgresql://")
    assert config.status.redis_url.startswith("redis://")


def test_defaults_are_embedded_and_kochava_enabled() -> None:
    config = Config()
    assert config.storage.url == "sqlite:///data/gateway.db"
    assert config.status.redis_url == ""
    assert config.partner_enabled("kochava")
    assert not config.partner_enabled("acme")
    assert {"Facebook", "X", "Twitter"} <= set(config.restricted_networks)


def test_environment_overrides(tmp_path: Path) -> None:
    env = {
        "GATEWAY_CONFIG": str(ROOT / "config" / "gateway.toml"),
        "GATEWAY_STORAGE_URL": "postgresql://u@db/gw",
        "GATEWAY_REDIS_URL": "redis://cache:6379/2",
        "GATEWAY_ADMIN_TOKEN": "t0k",
        "GATEWAY_DATA_DIR": str(tmp_path),
    }
    config = load_config(env=env)
    assert config.storage.url == "postgresql://u@db/gw"
    assert config.status.redis_url == "redis://cache:6379/2"
    assert config.admin_token == "t0k"
    assert config.data_dir == str(tmp_path)


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text("[partners.kochava]\nenabled = false\n[limits]\nmax_body_bytes = 1024\n")
    config = load_config(env={"GATEWAY_CONFIG": str(path)})
    assert not config.partner_enabled("kochava")
    assert config.limits.max_body_bytes == 1024


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[storage]\nurl = 'mysql://x'\n", "storage.url"),
        ("[server]\nport = 'eighty'\n", "port"),
        ("unknown_setting = 1\n", "unknown_setting"),
        ("[limits]\nmax_body_bytes = 0\n", "max_body_bytes"),
        ("[partners.kochava\n", "not valid TOML"),
    ],
)
def test_invalid_config_is_refused_with_a_reason(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(env={"GATEWAY_CONFIG": str(path)})


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(env={"GATEWAY_CONFIG": str(tmp_path / "nope.toml")})


def test_admin_token_is_generated_once_and_private(tmp_path: Path) -> None:
    config = Config(data_dir=str(tmp_path / "d"))
    token = admin_token(config)
    assert len(token) >= 40
    assert admin_token(config) == token
    path = tmp_path / "d" / "admin-token"
    assert path.stat().st_mode & 0o777 == 0o600


def test_switching_a_partner_off_answers_403(tmp_path: Path) -> None:
    config = make_config(tmp_path, kochava=False)
    key = new_key(config)
    with TestClient(create_app(config)) as client:
        r = client.post(f"/partners/kochava/postback?api_key={key}", json={"event_name": "x"})
    assert r.status_code == 403
    assert r.json()["reason"] == "partner 'kochava' is disabled in config"


def test_smaller_body_cap_from_config(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    config = msgspec.structs.replace(
        config, limits=msgspec.structs.replace(config.limits, max_body_bytes=100)
    )
    key = new_key(config)
    with TestClient(create_app(config)) as client:
        r = client.post(f"/partners/kochava/postback?api_key={key}", content=b"{" + b" " * 200)
    assert r.status_code == 413
    assert r.json()["reason"] == "body larger than 100 bytes"
