"""The shared storage layer: one protocol, with SQLite (embedded default) and PostgreSQL.

Storage holds the accepted events (idempotent on ``(partner, dedupe_key)``) and the partners'
API keys (hashes only). Every backend makes an event durable before ``store`` returns and raises
:class:`~gateway.errors.StorageUnavailable` when it cannot.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

import msgspec

from gateway.events import DEVICE_ID_FIELDS, AttributionEvent, event_encoder


class StoreResult(msgspec.Struct, frozen=True):
    stored: bool  # False: an event with the same dedupe key was already there
    event_id: str  # the id of the stored event (the earlier one for a duplicate)


class ReplaceResult(msgspec.Struct, frozen=True):
    # stored: new; updated: it replaced the stored event; unchanged: it was stored exactly so
    outcome: Literal["stored", "updated", "unchanged"]
    event_id: str  # the id of the stored event (the earlier one unless it is new)


class Purged(msgspec.Struct, frozen=True):
    raw: int = 0  # events whose raw payload was removed
    device_ids: int = 0  # events whose device ids were removed


#: Bits of an event's ``purged`` column: what retention has removed from it.
PURGED_RAW = 1
PURGED_DEVICE_IDS = 2


class KeyRecord(msgspec.Struct, kw_only=True):
    key_id: str
    partner: str
    hint: str  # the key's last characters, to tell keys apart in listings
    created_at: datetime
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None


class Storage(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise StorageUnavailable unless the backend answers."""

    async def store(self, events: Sequence[AttributionEvent]) -> list[StoreResult]:
        """Store events in one transaction; an event whose dedupe key exists is not stored.
        Each event's event_id must be new (``map_payload`` makes one per event): for an event
        stored again under its own id, ``stored`` is unspecified."""

    async def events(self, partner: str | None = None, limit: int = 50) -> list[AttributionEvent]:
        """The most recently stored events, newest first."""

    async def count(self, partner: str | None = None) -> int: ...

    async def replace(self, events: Sequence[AttributionEvent]) -> list[ReplaceResult]:
        """Store events in one transaction; an event whose dedupe key exists replaces the stored
        one, which keeps its event_id and received_at (a re-map: see :func:`replacement`)."""

    async def find(self, partner: str, dedupe_keys: Sequence[str]) -> dict[str, AttributionEvent]:
        """The partner's stored events with these dedupe keys, by dedupe key."""

    async def scan(
        self, partner: str | None = None, after: str | None = None, limit: int = 500
    ) -> list[AttributionEvent]:
        """Up to ``limit`` events in the order they were stored, oldest first, starting after the
        event whose event_id is ``after`` (from the first when None): to read them all in pages."""

    async def add_key(self, record: KeyRecord, key_hash: str) -> None: ...

    async def active_key_hashes(self, partner: str) -> list[tuple[str, str]]:
        """(key_id, key_hash) of the partner's keys that are not revoked."""

    async def keys(self, partner: str | None = None) -> list[KeyRecord]: ...

    async def revoke_key(self, key_id: str, at: datetime) -> bool:
        """Revoke a key; False if there is no such active key."""

    async def touch_key(self, key_id: str, at: datetime) -> None:
        """Record that the key was used at ``at`` (never moves the time back)."""

    async def update_key_hash(self, key_id: str, old_hash: str, new_hash: str) -> None:
        """Replace a key's stored hash, if it is still ``old_hash``."""

    async def purge(
        self, raw_before: datetime | None, device_ids_before: datetime | None, batch: int = 500
    ) -> Purged:
        """Retention: remove the raw payload of events received before ``raw_before`` and the
        device ids (:data:`~gateway.events.DEVICE_ID_FIELDS`) of those received before
        ``device_ids_before`` (None: not that part), keeping the rest of the event. Works in
        transactions of ``batch`` events; idempotent, and safe to run in several processes at
        once. A re-map (``replace``) of a purged event makes it due again."""


def replacement(new: AttributionEvent, old: AttributionEvent) -> AttributionEvent | None:
    """``new`` as it replaces the stored ``old`` (same partner and dedupe key): with old's
    event_id and received_at. None when that is exactly what is stored already."""
    merged = msgspec.structs.replace(new, event_id=old.event_id, received_at=old.received_at)
    return None if event_encoder.encode(merged) == event_encoder.encode(old) else merged


def scrubbed(event: AttributionEvent, bit: int) -> AttributionEvent:
    """``event`` without what the purge ``bit`` removes (see :data:`PURGED_RAW`)."""
    if bit == PURGED_RAW:
        return msgspec.structs.replace(event, raw={})
    return msgspec.structs.replace(event, **dict.fromkeys(DEVICE_ID_FIELDS))


def open_storage(url: str) -> Storage:
    """The backend for a storage URL (not yet opened)."""
    if url.startswith("sqlite:///"):
        from gateway.storage.sqlite import SQLiteStorage

        return SQLiteStorage(Path(url.removeprefix("sqlite:///")))
    if url.startswith(("postgresql://", "postgres://")):
        from gateway.storage.postgres import PostgresStorage

        return PostgresStorage(url)
    raise ValueError(f"unsupported storage URL scheme: {url.split(':')[0]!r}")
