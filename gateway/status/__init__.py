"""Per-partner connection status: the time of the last accepted attributed install and counters.

Kept in Redis in production (shared by every gateway process) and in an embedded SQLite file when
no Redis URL is configured. Status is bookkeeping: a status store that fails never turns an
accepted postback into an error (the event is already durable); the failure is logged.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Protocol

import msgspec

#: Every counter a partner has, in display order.
COUNTERS: tuple[str, ...] = (
    "accepted",
    "duplicate",
    "ignored_organic",
    "ignored_restricted",
    "rejected",
    "unauthorized",
    "rate_limited",
)


class Counters(msgspec.Struct, kw_only=True):
    accepted: int = 0  # events stored
    duplicate: int = 0  # retries of an event already stored
    ignored_organic: int = 0
    ignored_restricted: int = 0
    rejected: int = 0  # authenticated requests refused with 400, 413 or 422
    unauthorized: int = 0  # requests refused with 401
    rate_limited: int = 0  # requests refused with 429: over the key's rate limit, retried later


class StatusRecord(msgspec.Struct, kw_only=True):
    last_success_at: datetime | None = None
    counters: Counters = msgspec.field(default_factory=Counters)


class Delta(msgspec.Struct, kw_only=True):
    """One partner's status updates not yet in the store: counter increments and the latest
    last_success_at among them."""

    counts: dict[str, int] = msgspec.field(default_factory=dict)
    success_at: datetime | None = None


class StatusStore(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None: ...

    async def record(
        self, partner: str, counts: Mapping[str, int], success_at: datetime | None = None
    ) -> None:
        """Add ``counts`` to the partner's counters; set last_success_at when given."""

    async def get(self, partner: str) -> StatusRecord: ...

    async def record_batch(self, batch: Mapping[str, Delta], writer: str, seq: int) -> None:
        """Apply several partners' deltas at once, all or nothing, at most once per
        ``(writer, seq)``: a batch re-sent after a lost reply is not counted twice. A writer's
        ``seq`` only grows. See :mod:`gateway.status.buffer`."""


class StatusNotes(StatusStore, Protocol):
    """A status store that also takes updates without being waited for (the postback path)."""

    def note(
        self, partner: str, counts: Mapping[str, int], success_at: datetime | None = None
    ) -> None:
        """Add the update; it is written later (see :mod:`gateway.status.buffer`)."""


def open_status(redis_url: str, data_dir: str, key_prefix: str = "gateway:") -> StatusStore:
    if redis_url:
        from gateway.status.redis import RedisStatusStore

        return RedisStatusStore(redis_url, key_prefix)
    from gateway.status.embedded import EmbeddedStatusStore

    return EmbeddedStatusStore(Path(data_dir) / "status.db")


def counters_from(values: Mapping[str, int]) -> Counters:
    return Counters(**{name: int(values.get(name, 0)) for name in COUNTERS})
