"""Per-key rate limit: at most ``[limits] rate_per_key`` requests per ``rate_window_seconds``.

Off by default (``rate_per_key = 0``): the gateway cannot know a partner's real volume, and a
backfill after an outage arrives as one large burst; see docs/security.md for why, and for a
value to choose.

What counts: every request made with a key, once the key is authenticated, whatever its answer
(accepted, duplicate, organic, refused as 400/408/413/415/422); a batch is one request. Requests
without a valid key are never counted, so a flood of bad keys cannot use up a real key's budget.
Each key has its own budget, so a partner's second key (during a rotation) has its own.

The window is fixed, starting at a key's first request after the previous window ended; the
answer past the limit is ``429`` with ``Retry-After``: the whole seconds until the window ends.
Counts are kept where status is kept, so they hold across workers, processes and hosts:

- Redis (``GATEWAY_REDIS_URL``): a Lua script INCRs ``<prefix>rate:<key id>`` and, when the
  window starts, sets its expiry (PEXPIRE), atomically; Redis's clock alone decides windows.
- otherwise the embedded status file (``<data_dir>/status.db``): one row per key, read and
  written in one ``BEGIN IMMEDIATE`` transaction.

The count is bookkeeping like status: if the store fails or takes longer than
:data:`LIMIT_TIMEOUT_S`, the request goes through (logged, and counted in
``gateway_status_errors_total``), since refusing partners' postbacks because Redis is down would
lose data that storage could still take.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.config import Config, LimitsConfig
from gateway.errors import RateLimited, StatusUnavailable
from gateway.metrics import Metrics
from gateway.sqlite_thread import SQLiteThread

if TYPE_CHECKING:
    from gateway.postback import Gateway

log = logging.getLogger("gateway.ratelimit")

#: Longest a postback waits for the count before going through without it.
LIMIT_TIMEOUT_S = 0.5


class Window(msgspec.Struct, frozen=True):
    count: int  # requests in the current window, this one included
    resets_in: float  # seconds until the window ends


class Limiter(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def hit(self, bucket: str, window_s: int) -> Window:
        """Count one request against ``bucket``; raise StatusUnavailable when the store fails."""


# -- Redis ----------------------------------------------------------------------------------------

# KEYS[1] the bucket, ARGV[1] the window in ms. A key without an expiry (just made, or left by
# some accident) gets one, so no window lasts for ever.
_HIT = """
local n = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
"""


class RedisLimiter:
    def __init__(self, url: str, key_prefix: str = "gateway:") -> None:
        self.url = url
        self.key_prefix = key_prefix
        self._client: aioredis.Redis | None = None

    async def open(self) -> None:
        self._client = aioredis.Redis.from_url(
            self.url, socket_timeout=2.0, socket_connect_timeout=2.0, decode_responses=True
        )
        self._script = self._client.register_script(_HIT)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def hit(self, bucket: str, window_s: int) -> Window:
        if self._client is None:
            raise StatusUnavailable("rate limiter is not open")
        try:
            count, ttl_ms = await self._script(
                keys=[f"{self.key_prefix}rate:{bucket}"], args=[window_s * 1000]
            )
        except (RedisError, OSError) as exc:
            raise StatusUnavailable(f"redis unavailable: {exc}") from exc
        return Window(count=int(count), resets_in=int(ttl_ms) / 1000)


# -- the embedded status file ---------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS rate_windows (
    bucket  TEXT PRIMARY KEY,
    ends_us INTEGER NOT NULL,
    count   INTEGER NOT NULL
);
"""


class EmbeddedLimiter:
    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock  # seconds since the epoch; the windows of every process on this host
        self._db = SQLiteThread(path, SCHEMA, StatusUnavailable, synchronous="NORMAL")

    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    async def hit(self, bucket: str, window_s: int) -> Window:
        now_us = int(self.clock() * 1_000_000)

        def work(conn: sqlite3.Connection) -> Window:
            row = conn.execute(
                "SELECT ends_us, count FROM rate_windows WHERE bucket = ?", (bucket,)
            ).fetchone()
            if row is None or row[0] <= now_us:  # no window, or it has ended: a new one
                ends_us, count = now_us + window_s * 1_000_000, 1
            else:
                ends_us, count = row[0], row[1] + 1
            conn.execute(
                "INSERT INTO rate_windows (bucket, ends_us, count) VALUES (?, ?, ?)"
                " ON CONFLICT (bucket) DO UPDATE SET ends_us = excluded.ends_us,"
                " count = excluded.count",
                (bucket, ends_us, count),
            )
            return Window(count=count, resets_in=(ends_us - now_us) / 1_000_000)

        return await self._db.transaction(work)


def open_limiter(config: Config) -> Limiter:
    """The limiter beside the configured status store (not yet opened)."""
    if config.status.redis_url:
        return RedisLimiter(config.status.redis_url, config.status.key_prefix)
    return EmbeddedLimiter(Path(config.data_dir) / "status.db")


# -- the check ------------------------------------------------------------------------------------


async def enforce(
    limiter: Limiter | None, key_id: str, limits: LimitsConfig, metrics: Metrics
) -> None:
    """Count a request made with the (authenticated) key ``key_id``; raise RateLimited when it
    is over the limit. No limiter, or ``rate_per_key = 0``: nothing is counted."""
    if limiter is None or limits.rate_per_key <= 0:
        return
    try:
        window = await asyncio.wait_for(
            limiter.hit(key_id, limits.rate_window_seconds), LIMIT_TIMEOUT_S
        )
    except StatusUnavailable as exc:
        metrics.status_errors.inc()
        log.warning("rate limit not counted for key %s: %s", key_id, exc.reason)
        return
    except TimeoutError:
        metrics.status_errors.inc()
        log.warning("rate limit for key %s not counted within %ss", key_id, LIMIT_TIMEOUT_S)
        return
    if window.count > limits.rate_per_key:
        retry_after = max(1, math.ceil(window.resets_in))
        raise RateLimited(
            f"this key's limit of {limits.rate_per_key} requests per "
            f"{limits.rate_window_seconds} s is used up; retry after {retry_after} s",
            retry_after,
        )


@asynccontextmanager
async def rate_limiting(gw: Gateway) -> AsyncIterator[None]:
    """For the app's lifespan: the limiter opened, on ``gw``, while the app runs. Opened
    whatever ``rate_per_key`` is, so a limit switched on by a config reload applies at once."""
    limiter = open_limiter(gw.config)
    await limiter.open()
    gw.limiter = limiter
    try:
        yield
    finally:
        gw.limiter = None
        await limiter.close()
