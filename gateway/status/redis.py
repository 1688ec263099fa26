"""Status in Redis: one hash per partner, ``<prefix>status:<partner>``."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

import msgspec
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from gateway.errors import StatusUnavailable
from gateway.normalise import as_utc
from gateway.status import COUNTERS, Delta, StatusRecord, counters_from

# Sets last_success_at only if it moves the time forward, so concurrent requests from several
# gateway processes cannot move it back.
_SET_LATEST = """
local current = redis.call('HGET', KEYS[1], 'last_success_at_us')
if (not current) or tonumber(current) < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'last_success_at_us', ARGV[1], 'last_success_at', ARGV[2])
end
return 1
"""


# A batch of several partners' deltas, applied at most once per (writer, seq): KEYS[1] holds the
# writer's last applied seq, KEYS[2..] are the partners' hashes; ARGV[1] is the seq, ARGV[2] the
# seconds the writer's key is kept, ARGV[3..] one JSON delta per partner hash:
# {"c": {counter: n}, "us": "<micros>", "at": "<iso>"} ("us"/"at" only with a success time).
# A script runs atomically and is written to the AOF whole: all of the batch or none of it.
_APPLY_BATCH = """
local seq = tonumber(ARGV[1])
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
if seq <= last then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
for i = 2, #KEYS do
  local delta = cjson.decode(ARGV[i + 1])
  for name, n in pairs(delta.c) do
    redis.call('HINCRBY', KEYS[i], name, n)
  end
  if delta.us then
    local current = redis.call('HGET', KEYS[i], 'last_success_at_us')
    if (not current) or tonumber(current) < tonumber(delta.us) then
      redis.call('HSET', KEYS[i], 'last_success_at_us', delta.us, 'last_success_at', delta.at)
    end
  end
end
return 1
"""

#: How long a writer's last seq is kept after its last write: far longer than a batch can stay
#: in doubt (it is re-sent every second until it is known to be written).
WRITER_TTL_S = 7 * 24 * 3600

_delta_encoder = msgspec.json.Encoder()


class RedisStatusStore:
    def __init__(self, url: str, key_prefix: str = "gateway:") -> None:
        self.url = url
        self.key_prefix = key_prefix
        self._client: aioredis.Redis | None = None
        self._apply_batch: AsyncScript | None = None

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
            self._apply_batch = None

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

    async def record_batch(self, batch: Mapping[str, Delta], writer: str, seq: int) -> None:
        keys = [f"{self.key_prefix}status-writer:{writer}"]
        args: list[str | int] = [seq, WRITER_TTL_S]
        for partner, delta in batch.items():
            item: dict[str, object] = {"c": {k: n for k, n in delta.counts.items() if n}}
            if delta.success_at is not None:
                moment = as_utc(delta.success_at)
                item["us"] = str(int(moment.timestamp() * 1_000_000))
                item["at"] = moment.isoformat()
            keys.append(self._key(partner))
            args.append(_delta_encoder.encode(item).decode())
        try:
            # EVALSHA, and EVAL when the server does not know the script (after a restart).
            if self._apply_batch is None:
                self._apply_batch = self.client.register_script(_APPLY_BATCH)
            await self._apply_batch(keys=keys, args=args)
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
