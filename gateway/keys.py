"""Partner API keys: made here, shown once, stored only as keyed hashes (HMAC-SHA256).

Keys are 256 bits of randomness, so a fast keyed hash is as good as a slow password hash and
costs nothing on the hot path. The hash is keyed with a server secret (``GATEWAY_KEY_SECRET``,
``key_secret`` in config, or one generated once into ``<data_dir>/key-secret``): a copy of the
database alone does not let anyone test guesses or recognise a key seen elsewhere. Checking
compares the hash in constant time against each of the partner's active keys (several may be
active at once, for rotation).

A stored hash reads ``hmac-sha256:<secret id>:<hex digest>``. The secret id (8 hex digits of an
HMAC of a constant, revealing nothing of the secret) tells apart keys hashed with another
secret, so a host started with the wrong secret says so in its log instead of silently refusing
every key. Hashes without a scheme are plain SHA-256 hashes written by earlier versions: they
are still accepted, and rewritten as keyed hashes the first time the key is used.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import secrets
from datetime import UTC, datetime
from pathlib import Path

from gateway.config import Config, generated_secret
from gateway.errors import StorageUnavailable, Unauthorized
from gateway.storage import KeyRecord, Storage

log = logging.getLogger("gateway.keys")

KEY_PREFIX = "gwk_"
SCHEME = "hmac-sha256"

#: Secret ids already reported as foreign, so the log says it once per process and partner.
_reported: set[tuple[str, str]] = set()


def key_secret(config: Config) -> bytes:
    """The configured key secret, or one generated once and kept in the data folder."""
    text = config.key_secret or generated_secret(Path(config.data_dir) / "key-secret")
    return text.encode("utf-8")


@functools.lru_cache(maxsize=16)
def secret_id(secret: bytes) -> str:
    return hmac.new(secret, b"gateway api key secret id", hashlib.sha256).hexdigest()[:8]


def _digest(key: str, secret: bytes) -> str:
    # hmac.new, not hmac.digest: the one-shot call lets go of the interpreter lock, and on a
    # busy gateway winning it back from the storage thread costs more than the hash itself.
    return hmac.new(secret, key.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def hash_key(key: str, secret: bytes) -> str:
    """What is stored for ``key``: never the key, nor its plain SHA-256."""
    return f"{SCHEME}:{secret_id(secret)}:{_digest(key, secret)}"


def legacy_hash(key: str) -> str:
    """The plain SHA-256 hash earlier versions stored."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def mask(key_id: str, hint: str) -> str:
    return f"{KEY_PREFIX}…{hint}  ({key_id})"


async def create_key(storage: Storage, partner: str, secret: bytes) -> tuple[KeyRecord, str]:
    """Make a new active key for ``partner``; returns its record and the key itself."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    record = KeyRecord(
        key_id="key_" + secrets.token_hex(6),
        partner=partner,
        hint=key[-4:],
        created_at=datetime.now(UTC),
    )
    await storage.add_key(record, hash_key(key, secret))
    return record, key


async def check_key(storage: Storage, partner: str, key: str | None, secret: bytes) -> str:
    """The id of the partner's active key matching ``key``; raises Unauthorized otherwise."""
    if not key:
        raise Unauthorized(
            "missing API key: send it as ?api_key=, an Authorization: Bearer header, "
            "an X-Api-Key header or an api_key field"
        )
    ours = secret_id(secret)
    keyed = f"{SCHEME}:{ours}:{_digest(key, secret)}"
    plain = None
    found = legacy = None
    foreign: set[str] = set()
    for key_id, stored in await storage.active_key_hashes(partner):
        # Compare against every key, so the time taken does not depend on which one matched.
        if stored.startswith(SCHEME + ":"):
            if hmac.compare_digest(keyed.encode(), stored.encode()):
                found = key_id
            elif stored.split(":")[1] != ours:
                foreign.add(stored.split(":")[1])
        else:
            plain = plain or legacy_hash(key)
            if hmac.compare_digest(plain.encode(), stored.encode()):
                found = legacy = key_id
    if found is None:
        _report_foreign(partner, ours, foreign)
        raise Unauthorized(f"invalid API key for partner {partner!r}")
    if legacy is not None and plain is not None:
        await _upgrade(storage, legacy, plain, hash_key(key, secret))
    return found


async def _upgrade(storage: Storage, key_id: str, old: str, new: str) -> None:
    """Rewrite a plain SHA-256 hash as a keyed one; the key works either way meanwhile."""
    try:
        await storage.update_key_hash(key_id, old, new)
    except StorageUnavailable as exc:
        log.warning("hash of key %s not upgraded: %s", key_id, exc.reason)


def _report_foreign(partner: str, ours: str, foreign: set[str]) -> None:
    for other in sorted(foreign):
        if (partner, other) in _reported:
            continue
        _reported.add((partner, other))
        log.error(
            "keys of partner %s were hashed with another key secret (id %s; this process has "
            "id %s), so they are refused here: give every process and host the same "
            "GATEWAY_KEY_SECRET",
            partner,
            other,
            ours,
        )
