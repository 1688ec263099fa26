"""Partner API keys: made here, shown once, stored only as SHA-256 hashes.

Keys are 256 bits of randomness, so a plain SHA-256 is as good as a slow password hash and costs
nothing on the hot path. Checking compares the hash in constant time against each of the
partner's active keys (several may be active at once, for rotation).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime

from gateway.errors import Unauthorized
from gateway.storage import KeyRecord, Storage

KEY_PREFIX = "gwk_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def mask(key_id: str, hint: str) -> str:
    return f"{KEY_PREFIX}…{hint}  ({key_id})"


async def create_key(storage: Storage, partner: str) -> tuple[KeyRecord, str]:
    """Make a new active key for ``partner``; returns its record and the key itself."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    record = KeyRecord(
        key_id="key_" + secrets.token_hex(6),
        partner=partner,
        hint=key[-4:],
        created_at=datetime.now(UTC),
    )
    await storage.add_key(record, hash_key(key))
    return record, key


async def check_key(storage: Storage, partner: str, key: str | None) -> str:
    """The id of the partner's active key matching ``key``; raises Unauthorized otherwise."""
    if not key:
        raise Unauthorized(
            "missing API key: send it as ?api_key=, an Authorization: Bearer header, "
            "an X-Api-Key header or an api_key field"
        )
    presented = hash_key(key)
    found = None
    for key_id, stored in await storage.active_key_hashes(partner):
        # Compare against every key so the time taken does not depend on which one matched.
        if hmac.compare_digest(presented, stored):
            found = key_id
    if found is None:
        raise Unauthorized(f"invalid API key for partner {partner!r}")
    return found
