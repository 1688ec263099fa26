"""Typed configuration: a TOML file, then environment overrides.

The defaults below are the embedded defaults that ``config/gateway.toml`` spells out (a test keeps
the two equal): SQLite under ``data/``, the embedded status store, the six built-in partners
enabled.

Environment overrides:

``GATEWAY_CONFIG``       path of the TOML file (default ``config/gateway.toml`` when present)
``GATEWAY_STORAGE_URL``  ``sqlite:///relative/path``, ``sqlite:////absolute/path`` or ``postgresql://…``
``GATEWAY_REDIS_URL``    ``redis://…``; unset or empty means the embedded status store
``GATEWAY_ADMIN_TOKEN``  bearer token for the admin API
``GATEWAY_KEY_SECRET``   server secret that keys partner API key hashes (HMAC-SHA256)
``GATEWAY_DATA_DIR``     folder for the embedded stores and the generated admin token
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path

import msgspec

DEFAULT_CONFIG_PATH = Path("config/gateway.toml")

#: Shortest key secret accepted (characters); a generated one has 43.
MIN_KEY_SECRET = 32


class ConfigError(Exception):
    """The configuration cannot be used; the message says which setting and why."""


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    # Protocol limits of `gateway serve` (gateway/protocol.py): a request's line and headers
    # (431 past max_header_bytes, 408 past header_timeout_seconds) and its body (408).
    max_header_bytes: int = 64 * 1024
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 10.0


class StorageConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: str = "sqlite:///data/gateway.db"


class StatusConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    redis_url: str = ""
    key_prefix: str = "gateway:"


class LimitsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    max_body_bytes: int = 64 * 1024
    max_batch_events: int = 50
    # Per API key: at most rate_per_key requests per rate_window_seconds (0 = no limit); see
    # gateway/ratelimit.py and docs/security.md.
    rate_per_key: int = 0
    rate_window_seconds: int = 3600


class RetentionConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Days after which stored events lose their raw payload / their device ids (0 = keep them);
    # see gateway/retention.py and docs/security.md.
    raw_payload_days: int = 0
    device_ids_days: int = 0


#: Publish engines (gateway/publish/): "auto" is "redis-stream" when a Redis URL is configured.
PUBLISH_ENGINES = ("auto", "none", "redis-stream")


class PublishConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Accepted events also go to downstream consumers, at least once, through an outbox in
    # storage (gateway/publish/, README "Downstream consumers").
    engine: str = "auto"
    redis_url: str = ""  # empty: status.redis_url
    stream: str = ""  # empty: <status.key_prefix>events
    maxlen: int = 1_000_000  # the stream is trimmed to about this many entries; 0 = never
    batch_size: int = 500  # events per XADD round trip
    lease_seconds: float = 10.0  # one process publishes; another takes over this long after it died


def _validate_publish(config: Config) -> None:
    publish = config.publish
    if publish.engine not in PUBLISH_ENGINES:
        raise ConfigError(f"publish.engine must be one of {', '.join(PUBLISH_ENGINES)}")
    url = publish.redis_url
    if url and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("publish.redis_url must be a redis:// URL or empty")
    if not 0 <= publish.maxlen <= 1_000_000_000:
        raise ConfigError("publish.maxlen must be 0 (never trim) or a positive number")
    if not 1 <= publish.batch_size <= 10_000:
        raise ConfigError("publish.batch_size must be between 1 and 10000")
    if not 1 <= publish.lease_seconds <= 600:
        raise ConfigError("publish.lease_seconds must be between 1 and 600")


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
    key_secret: str = ""
    restricted_networks: list[str] = msgspec.field(default_factory=_default_restricted)
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    status: StatusConfig = msgspec.field(default_factory=StatusConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)
    publish: PublishConfig = msgspec.field(default_factory=PublishConfig)
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
    if env.get("GATEWAY_KEY_SECRET"):
        config.key_secret = env["GATEWAY_KEY_SECRET"]
    config.key_secret = config.key_secret.strip()
    if env.get("GATEWAY_DATA_DIR"):
        config.data_dir = env["GATEWAY_DATA_DIR"]
    validate(config)
    if config.publish.engine == "redis-stream" and not (
        config.publish.redis_url or config.status.redis_url
    ):  # checked once the environment is in: GATEWAY_REDIS_URL may give the URL
        raise ConfigError(
            'publish.engine = "redis-stream" needs publish.redis_url or status.redis_url'
            " (GATEWAY_REDIS_URL)"
        )
    return config


def parse_config(path: Path) -> Config:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_toml_text(text, path)


def parse_toml_text(text: str, path: Path) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    # A file lists the partners it enables: with no [partners.*] table at all, none is enabled
    # (the built-in defaults are for running with no config file).
    data.setdefault("partners", {})
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
    if not 1024 <= config.server.max_header_bytes <= 1024 * 1024:
        raise ConfigError("server.max_header_bytes must be between 1024 and 1048576")
    for name in ("header_timeout_seconds", "body_timeout_seconds"):
        if not 0.1 <= getattr(config.server, name) <= 600:
            raise ConfigError(f"server.{name} must be between 0.1 and 600")
    if config.key_secret and len(config.key_secret) < MIN_KEY_SECRET:
        raise ConfigError(
            f"key_secret (GATEWAY_KEY_SECRET) must be at least {MIN_KEY_SECRET} characters"
        )
    if not 0 <= config.limits.rate_per_key <= 1_000_000_000:
        raise ConfigError("limits.rate_per_key must be 0 (no limit) or a positive number")
    if not 1 <= config.limits.rate_window_seconds <= 31 * 24 * 3600:
        raise ConfigError("limits.rate_window_seconds must be between 1 and 2678400 (31 days)")
    for name in ("raw_payload_days", "device_ids_days"):
        if not 0 <= getattr(config.retention, name) <= 36_500:
            raise ConfigError(f"retention.{name} must be between 0 (keep) and 36500")
    _validate_publish(config)


def admin_token(config: Config) -> str:
    """The configured admin token, or one generated once and kept in the data folder."""
    if config.admin_token:
        return config.admin_token
    return generated_secret(Path(config.data_dir) / "admin-token")


def generated_secret(path: Path) -> str:
    """The secret kept in ``path``, made (mode 600) on first use."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    # Write a private temporary file, then link it into place: the link fails if another
    # process got there first, and nobody ever reads a half-written token.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
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
    """Switch a partner on or off in a config file, keeping the rest of it as it is (comments,
    line endings, file mode; a symlink is written through).

    Adds ``[partners.<name>]`` when the file has none. The new file replaces the old one in one
    rename, so a gateway watching it never reads half a file. Refuses, saying why, a file that
    declares partners in a layout it cannot edit (dotted keys, inline tables).
    """
    target = config_file.resolve()
    raw = target.read_bytes().decode("utf-8") if target.exists() else ""  # line endings kept
    bom = "\ufeff" if raw.startswith("\ufeff") else ""
    crlf = "\r\n" in raw
    text = raw.removeprefix("\ufeff").replace("\r\n", "\n")
    if text.strip():
        parse_toml_text(text, config_file)  # an invalid file is reported as it is
    value = "true" if enabled else "false"
    header = rf"^[ \t]*\[[ \t]*partners[ \t]*\.[ \t]*{re.escape(name)}[ \t]*\][ \t]*(#.*)?$"
    found = re.search(header, text, re.MULTILINE)
    if found is None:
        sep = "" if not text or text.endswith("\n") else "\n"
        text = f"{text}{sep}\n[partners.{name}]\nenabled = {value}\n"
    else:
        start = found.end()
        following = re.search(r"^[ \t]*\[", text[start:], re.MULTILINE)
        end = start + following.start() if following else len(text)
        body = text[start:end]
        line = re.compile(r"^([ \t]*)enabled[ \t]*=[ \t]*[^\s#]*", re.MULTILINE)
        if line.search(body):
            body = line.sub(lambda m: f"{m.group(1)}enabled = {value}", body, count=1)
        else:
            body = f"\nenabled = {value}" + body
        text = text[:start] + body + text[end:]
    try:
        edited = parse_toml_text(text, config_file)
    except ConfigError:
        edited = None
    if edited is None or edited.partner_enabled(name) != enabled:
        raise ConfigError(
            f"{config_file}: cannot switch {name!r} here: the file declares partners in a layout "
            f"this cannot edit (dotted keys or inline tables); use a [partners.{name}] table "
            "with enabled = true/false, or edit the file by hand"
        )
    if crlf:
        text = text.replace("\n", "\r\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(bom + text, encoding="utf-8", newline="")
    if target.exists():
        os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
    os.replace(tmp, target)
