"""The publisher task: moves events from the outbox to the engine, in every gateway process.

Only the process holding the outbox lease publishes (one per database, whatever the number of
processes and hosts), so events reach the engine oldest first and, while nothing fails, once
each. The others try to take the lease every second; a holder that stops lets it go at once,
one that dies loses it after ``[publish] lease_seconds``.

A round: read up to ``batch_size`` events from the outbox, oldest first; hand them to the engine;
delete them from the outbox. When the engine or storage fails the holder lets the lease go (a
process that can reach the engine may take over), waits (0.5 s, doubling up to 10 s) and tries
again; nothing is lost, the events wait in the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from gateway.config import Config
from gateway.errors import StorageUnavailable
from gateway.metrics import Metrics
from gateway.publish import ENGINES, Publisher, PublishUnavailable, publish_settings
from gateway.publish.outbox import Outbox, open_outbox

log = logging.getLogger("gateway.publish")

#: The outbox lease's name: one publisher per database.
LEASE = "publisher"
#: Seconds a lease lasts unless renewed (``[publish] lease_seconds``); renewed when half is left.
LEASE_SECONDS = 10.0
#: Seconds between looks at an empty outbox (the longest an event waits when all is well).
POLL_S = 0.2
#: Seconds between a follower's attempts to take the lease.
FOLLOW_S = 1.0
#: Pause after a failed round: doubles from the first to the second.
BACKOFF_S = (0.5, 10.0)
#: While failing, a warning at most this often (seconds).
WARN_EVERY_S = 30.0
#: Longest a stopping relay waits for its round to finish before cancelling it.
STOP_S = 5.0


class OutboxRelay:
    def __init__(
        self,
        outbox: Outbox,
        publisher: Publisher,
        metrics: Metrics,
        batch_size: int = 500,
        *,
        lease_seconds: float = LEASE_SECONDS,
        poll_s: float = POLL_S,
    ) -> None:
        self.outbox = outbox
        self.publisher = publisher
        self.metrics = metrics
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        self.poll_s = poll_s
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._lease_until = 0.0  # time.monotonic() until which this process surely holds it
        self._leading = False
        self._failing_since: float | None = None
        self._last_warning = 0.0
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="outbox-relay")

    async def stop(self) -> None:
        """Finish the round under way (or cancel it after :data:`STOP_S`), let the lease go."""
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(task, STOP_S)
            except TimeoutError:  # wait_for has cancelled it
                log.warning("publish: stopped in the middle of a round")
            except Exception:  # pragma: no cover - run() handles its own errors
                log.exception("publish: relay failed")
        if self._leading:
            self._leading = False
            self.metrics.publish_lag.set(0)
            with contextlib.suppress(StorageUnavailable, TimeoutError):
                await asyncio.wait_for(self.outbox.drop_lease(LEASE, self.holder), 2.0)

    async def run(self) -> None:
        backoff = BACKOFF_S[0]
        while not self._stopping.is_set():
            try:
                if not await self.lead():
                    await self._pause(FOLLOW_S)
                    continue
                published = await self.round()
            except (PublishUnavailable, StorageUnavailable) as exc:
                self._failed(exc.reason)
            except Exception as exc:
                log.exception("publish: unexpected error")
                self._failed(type(exc).__name__)
            else:
                self._recovered()
                backoff = BACKOFF_S[0]
                if published < self.batch_size:  # a full batch: more may be waiting
                    await self._pause(self.poll_s)
                continue
            await self._let_go()
            await self._pause(backoff)
            backoff = min(backoff * 2, BACKOFF_S[1])

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # -- one round -----------------------------------------------------------------------------

    async def lead(self) -> bool:
        """Whether this process holds the lease (taken or renewed when half of it is left)."""
        now = time.monotonic()
        if now < self._lease_until - self.lease_seconds / 2:
            return True
        held = await self.outbox.take_lease(LEASE, self.holder, self.lease_seconds)
        self._lease_until = now + self.lease_seconds if held else 0.0
        if held and not self._leading:
            log.info("publish: this process publishes now (%s)", self.holder)
        elif not held and self._leading:
            log.info("publish: another process publishes now")
            self.metrics.publish_lag.set(0)
        self._leading = held
        return held

    async def round(self) -> int:
        """Publish one batch from the outbox (the caller holds the lease); how many events."""
        entries = await self.outbox.pending(self.batch_size)
        oldest = entries[0].received_at if entries else None
        lag = (datetime.now(UTC) - oldest).total_seconds() if oldest is not None else 0.0
        self.metrics.publish_lag.set(max(lag, 0.0))
        if not entries:
            return 0
        await self.publisher.publish(entries)
        # Published; should the next step fail, the batch is published again (consumers dedupe).
        await self.outbox.done([entry.seq for entry in entries])
        self.metrics.published.inc(len(entries))
        return len(entries)

    async def _let_go(self) -> None:
        """After a failure: another process may do better (one that can reach the engine)."""
        if not self._leading:
            return
        self._leading = False
        self._lease_until = 0.0
        with contextlib.suppress(StorageUnavailable):
            await self.outbox.drop_lease(LEASE, self.holder)

    def _failed(self, reason: str) -> None:
        self.metrics.publish_errors.inc()
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._last_warning < WARN_EVERY_S:
            return
        self._last_warning = now
        log.warning(
            "publish: %s; events wait in the outbox (failing for %.0f s)",
            reason,
            now - self._failing_since,
        )

    def _recovered(self) -> None:
        if self._failing_since is not None:
            log.info(
                "publish: %s works again after %.0f s",
                self.publisher.describe(),
                time.monotonic() - self._failing_since,
            )
            self._failing_since = None


@asynccontextmanager
async def publishing(config: Config, metrics: Metrics) -> AsyncIterator[OutboxRelay | None]:
    """For the app's lifespan: install the outbox before the first request is served, run the
    relay while the app runs. Yields None (and does nothing) when publishing is off."""
    settings = publish_settings(config)
    if settings is None:
        yield None
        return
    outbox = open_outbox(config.storage.url)
    await outbox.open()
    try:
        publisher = ENGINES[settings.engine](settings)
        await publisher.open()
        try:
            relay = OutboxRelay(
                outbox,
                publisher,
                metrics,
                settings.batch_size,
                lease_seconds=settings.lease_seconds,
            )
            relay.start()
            try:
                yield relay
            finally:
                await relay.stop()
        finally:
            await publisher.close()
    finally:
        await outbox.close()
