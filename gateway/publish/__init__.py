"""Publishing accepted events to downstream consumers, at least once.

A partner is answered 202 once its event is durable in storage, whether or not the downstream
engine (a Redis Stream) is up at that moment. So events are never published from the request:

1. **Outbox** (:mod:`gateway.publish.outbox`). Publishing installs a table ``event_outbox`` in
   storage and a trigger on ``events`` that adds the ``seq`` of every stored event to it, in the
   same transaction as the event. An event is in the outbox exactly when it is stored and not yet
   published; the storage backends' own code is unchanged by it.
2. **Relay** (:mod:`gateway.publish.relay`). A background task in every gateway process. The
   processes sharing a database elect one publisher with a lease row in that database; it reads
   the outbox oldest first, hands each batch to the engine, and deletes the batch from the outbox
   once the engine has it. When the engine or storage fails it lets the lease go, backs off and
   tries again; the events wait in the outbox meanwhile.
3. **Engine** (a :class:`Publisher`). ``redis-stream`` (:mod:`gateway.publish.redis_stream`)
   XADDs each event with its ``event_id``. Another engine is a class with the three methods of
   :class:`Publisher`, added to :data:`ENGINES` and to ``gateway.config.PUBLISH_ENGINES``.

Delivery is at least once, not exactly once: a publisher that stops between the engine taking a
batch and the outbox forgetting it, or that loses its lease while stalled, makes another publish
the batch again. Consumers dedupe by ``event_id`` (``examples/stream_consumer.py`` does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol

import msgspec

from gateway.config import Config, ConfigError


class PublishUnavailable(Exception):
    """The engine did not take a batch; the whole batch is tried again later."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class OutboxEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One stored event waiting to be published."""

    seq: int  # storage's order of the event
    event_id: str
    partner: str
    kind: str
    received_at: datetime | None
    body: bytes  # the stored event as JSON, exactly as GET /events shows it


class Publisher(Protocol):
    """An engine that delivers events downstream."""

    async def open(self) -> None:
        """Prepare the client; must not fail because the engine is down (publish will)."""

    async def close(self) -> None: ...

    async def publish(self, entries: Sequence[OutboxEntry]) -> None:
        """Deliver every entry, in order, or raise :class:`PublishUnavailable`. After a raise the
        same entries come again, so an engine that took some of them delivers those twice."""

    def describe(self) -> str:
        """Where events go, for logs (never a password)."""


class PublishSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The ``[publish]`` table with its defaults resolved."""

    engine: str  # a key of ENGINES
    redis_url: str
    stream: str
    maxlen: int
    batch_size: int
    lease_seconds: float


def publish_settings(config: Config) -> PublishSettings | None:
    """What this process publishes to, or None when publishing is off."""
    publish = config.publish
    redis_url = publish.redis_url or config.status.redis_url
    engine = publish.engine
    if engine == "auto":
        engine = "redis-stream" if redis_url else "none"
    if engine == "none":
        return None
    if engine == "redis-stream" and not redis_url:
        raise ConfigError(
            'publish.engine = "redis-stream" needs publish.redis_url or status.redis_url'
            " (GATEWAY_REDIS_URL)"
        )
    return PublishSettings(
        engine=engine,
        redis_url=redis_url,
        stream=publish.stream or f"{config.status.key_prefix}events",
        maxlen=publish.maxlen,
        batch_size=publish.batch_size,
        lease_seconds=publish.lease_seconds,
    )


def _redis_stream(settings: PublishSettings) -> Publisher:
    from gateway.publish.redis_stream import RedisStreamPublisher

    return RedisStreamPublisher(settings.redis_url, settings.stream, settings.maxlen)


#: Engine name → the engine made from the settings. Every name but "auto" and "none" of
#: ``gateway.config.PUBLISH_ENGINES`` is here (a test keeps the two equal).
ENGINES: dict[str, Callable[[PublishSettings], Publisher]] = {"redis-stream": _redis_stream}
