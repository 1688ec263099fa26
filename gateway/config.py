"""Typed configuration: a TOML file, then environment overrides.

The defaults below are the embedded defaults that ``config/gateway.toml`` spells out (a test keeps
the two equal): SQLite under ``data/``, the embedded status store, the six built-in partners
enabled.

Environment overrides:

``GATEWAY_CONFIG``       path of the TOML file (default ``config/gateway.toml`` when present)
``GATEWAY_STORAGE_URL``  ``sqlite:///relative/path``, ``sqlite:////absolute/path`` or ``postgresql://…``
``GATEWAY_REDIS_URL``    ``redis://…``; unset or empty means the embedded status store
``GATEWAY_ADMIN_TOKEN``  bearer token for the admin API
``GATEWAY_DATA_DIR``     folder for the embedded stores and the generated admin token
"""

from __future__ import annotations

import os
import re
import secrets
import tomllib
from collections.abc import Mapping
from pathlib import Path

import msgspec

DEFAULT_CONFIG_PATH = Path("config/gateway.toml")


class ConfigError(Exception):
    """The configuration cannot be used; the message says which setting and why."""


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1


class StorageConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: str = "sqlite:///data/gateway.db"


class StatusConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    redis_url: str = ""
    key_prefix: str = "gateway:"


class LimitsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    max_body_bytes: int = 64 * 1024
    max_batch_events: int = 50


class PartnerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = False


def _default_partners() -> dict[str, PartnerConfig]:
    names = ("kochava", "appsflyer", "adjust", "branch", "singular", "tune")
    return {name: PartnerConfig(enabled=True) for name in names}


def _default_restricted() -> list[str]:
    return ["Facebook", "Instagram", "X", "Twitter"]


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    data_dir: str = "data"
    admin_token: str = ""
    restricted_networks: list[str] = msgspec.field(default_factory=_default_restricted)
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    status: StatusConfig = msgspec.field(default_factory=StatusConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    partners: dict[str, PartnerConfig] = msgspec.field(default_factory=_default_partners)

    def partner_enabled(self, name: str) -> bool:
        partner = self.partners.get(name)
        return partner is not None and partner.enabled


def config_path(env: Mapping[str, str] | None = None) -> Path | None:
    env = os.environ if env is None else env
    if env.get("GATEWAY_CONFIG"):
        return Path(env["GATEWAY_CONFIG"])
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


def load_config(path: Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read the config file (if any) and apply environment overrides."""
    env = os.environ if env is None else env
    path = path if path is not None else config_path(env)
    if path is None:
        config = Config()
    else:
        config = parse_config(path)
    if env.get("GATEWAY_STORAGE_URL"):
        config.storage.url = env["GATEWAY_STORAGE_URL"]
    if "GATEWAY_REDIS_URL" in env:
        config.status.redis_url = env["GATEWAY_REDIS_URL"]
    if env.get("GATEWAY_ADMIN_TOKEN"):
        config.admin_token = env["GATEWAY_ADMIN_TOKEN"]
    config.admin_token = config.admin_token.strip()
    if env.get("GATEWAY_DATA_DIR"):
        config.data_dir = env["GATEWAY_DATA_DIR"]
    validate(config)
    return config


def parse_config(path: Path) -> Config:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_toml_text(text, path)


def parse_toml_text(text: str, path: Path) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    validate(config)
    return config


def validate(config: Config) -> None:
    url = config.storage.url
    if not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ConfigError(
            f"storage.url must start with sqlite:/// or postgresql://, got {url.split(':')[0]!r}"
        )
    redis_url = config.status.redis_url
    if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("status.redis_url must be a redis:// URL or empty")
    if not 1 <= config.limits.max_body_bytes <= 16 * 1024 * 1024:
        raise ConfigError("limits.max_body_bytes must be between 1 and 16 MiB")
    if not 1 <= config.limits.max_batch_events <= 10_000:
        raise ConfigError("limits.max_batch_events must be between 1 and 10000")
    if not 1 <= config.server.workers <= 64:
        raise ConfigError("server.workers must be between 1 and 64")


def admin_token(config: Config) -> str:
    """The configured admin token, or one generated once and kept in the data folder."""
    if config.admin_token:
        return config.admin_token
    path = Path(config.data_dir) / "admin-token"
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    # Write a private temporary file, then link it into place: the link fails if another
    # process got there first, and nobody ever reads a half-written token.
    tmp = path.with_name(f".admin-token.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        return path.read_text(encoding="utf-8").strip()
    finally:
        tmp.unlink()
    return token


def set_partner_enabled(config_file: Path, name: str, enabled: bool) -> None:
    """Switch a partner on or off in a config file, keeping the rest of it (comments included).

    Adds ``[partners.<name>]`` when the file has none. The new file replaces the old one in one
    rename, so a gateway watching it never reads half a file.
    """
    text = config_file.read_text(encoding="utf-8") if config_file.exists() else ""
    value = "true" if enabled else "false"
    table = re.compile(rf"^\[partners\.{re.escape(name)}\][ \t]*$", re.MULTILINE)
    found = table.search(text)
    if found is None:
        sep = "" if not text or text.endswith("\n") else "\n"
        text = f"{text}{sep}\n[partners.{name}]\nenabled = {value}\n"
    else:
        start = found.end()
        following = re.search(r"^\[", text[start:], re.MULTILINE)
        end = start + following.start() if following else len(text)
        body = text[start:end]
        line = re.compile(r"^enabled[ \t]*=.*$", re.MULTILINE)
        if line.search(body):
            body = line.sub(f"enabled = {value}", body, count=1)
        else:
            body = f"\nenabled = {value}" + body
        text = text[:start] + body + text[end:]
    parse_toml_text(text, config_file)  # never write a file the gateway would refuse
    config_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = config_file.with_name(f".{config_file.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, config_file)
