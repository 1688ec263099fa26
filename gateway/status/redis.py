"""Status in Redis: one hash per partner, ``<prefix>status:<partner>``."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.errors import StatusUnavailable
from gateway.normalise import as_utc
from gateway.status import COUNTERS, StatusRecord, counters_from

# Sets last_success_at only if it moves the time forward, so concurrent requests from several
# gateway processes cannot move it back.
_SET_LATEST = """
local current = redis.call('HGET', KEYS[1], 'last_success_at_us')
if (not current) or tonumber(current) < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'last_success_at_us', ARGV[1], 'last_success_at', ARGV[2])
end
return 1
"""


class RedisStatusStore:
    def __init__(self, url: str, key_prefix: str = "gateway:") -> None:
        self.url = url
        self.key_prefix = key_prefix
        self._client: aioredis.Redis | None = None

    def _key(self, partner: str) -> str:
        return f"{self.key_prefix}status:{partner}"

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise StatusUnavailable("status store is not open")
        return self._client

    async def open(self) -> None:
        self._client = aioredis.Redis.from_url(
            self.url, socket_timeout=2.0, socket_connect_timeout=2.0, decode_responses=True
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            raise StatusUnavailable(f"redis unavailable: {exc}") from exc

    async def record(
        self, partner: str, counts: Mapping[str, int], success_at: datetime | None = None
    ) -> None:
        key = self._key(partner)
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for name, n in counts.items():
                    if n:
                        pipe.hincrby(key, name, n)
                if success_at is not None:
                    moment = as_utc(success_at)
                    micros = int(moment.timestamp() * 1_000_000)
                    pipe.eval(_SET_LATEST, 1, key, str(micros), moment.isoformat())
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StatusUnavailable(f"redis unavailable: {exc}") from exc

    async def get(self, partner: str) -> StatusRecord:
        try:
            values = await self.client.hgetall(self._key(partner))
        except (RedisError, OSError) as exc:
            raise StatusUnavailable(f"redis unavailable: {exc}") from exc
        last = str(values.get("last_success_at") or "")
        return StatusRecord(
            last_success_at=datetime.fromisoformat(last) if last else None,
            counters=counters_from({k: int(values[k]) for k in COUNTERS if k in values}),
        )
