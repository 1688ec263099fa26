"""The ``redis-stream`` engine: each event is one stream entry.

Entry fields: ``event_id``, ``partner``, ``kind`` and ``event`` (the stored event as JSON, as
``GET /events`` shows it). A batch goes in one MULTI/EXEC, so Redis takes all of it or none of it;
only a reply lost after EXEC makes the relay send a batch twice. ``MAXLEN ~ maxlen`` trims the
stream as it grows (0: never): entries trimmed before a consumer group read them are lost to it.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.publish import OutboxEntry, PublishUnavailable

#: Seconds to connect and to wait for a reply before the batch counts as failed.
SOCKET_TIMEOUT_S = 2.0


class RedisStreamPublisher:
    def __init__(self, url: str, stream: str, maxlen: int = 0) -> None:
        self.url = url
        self.stream = stream
        self.maxlen = maxlen
        self._client: aioredis.Redis | None = None

    def describe(self) -> str:
        return f"redis stream {self.stream!r} at {_where(self.url)}"

    async def open(self) -> None:
        # Connects on first use: a Redis that is down now only delays publishing.
        self._client = aioredis.Redis.from_url(
            self.url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S
        )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def publish(self, entries: Sequence[OutboxEntry]) -> None:
        if self._client is None:
            raise PublishUnavailable(f"{self.describe()}: not open")
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                for entry in entries:
                    pipe.xadd(
                        self.stream,
                        {
                            "event_id": entry.event_id,
                            "partner": entry.partner,
                            "kind": entry.kind,
                            "event": entry.body,
                        },
                        maxlen=self.maxlen or None,
                        approximate=True,
                    )
                await pipe.execute()
        except (RedisError, OSError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise PublishUnavailable(f"{self.describe()}: {reason}") from exc


def _where(url: str) -> str:
    """host:port/db of a Redis URL, for messages (never the password)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    host = parts.hostname or "localhost"
    port = parts.port or 6379
    return f"{host}:{port}{parts.path or '/0'}"
