"""Status that catches up: updates the status store could not take are kept and written later.

Status is bookkeeping (DESIGN.md §6): a postback is answered once its event is durable, whether
or not Redis takes the status update. :class:`BufferedStatus` wraps the configured store so that
an outage costs no counts either:

- every update (counter increments and a last_success_at) is first added to a per-process
  *pending* delta, one entry per partner. Adding merges: increments are summed and only the
  latest last_success_at is kept, so memory is bounded by the number of partners, however long
  the outage lasts.
- writes are batched: one write *round* at a time takes everything pending, for every partner,
  and applies it in one store call (all or nothing). Updates that arrive meanwhile go to the
  next round, so a burst of postbacks costs a few store round trips, not one each.
- a postback does not wait for its update to be written (:meth:`BufferedStatus.note`): the
  first update after a round schedules the next one ``FLUSH_AFTER_S`` later, so under load a
  process writes status a few times a second, whatever the rate of postbacks. A read
  (:meth:`BufferedStatus.get`) first writes what this process has pending, so a process always
  reads its own updates; another process's show within ``FLUSH_AFTER_S`` (and its round trip).
- a round that fails or times out leaves its batch pending; the next round (the next postback's,
  or a retry every second while anything is pending) writes it. Each failed round counts in
  ``gateway_status_errors_total``.
- a batch whose outcome is unknown (sent, but the reply was lost when Redis died or timed out) is
  *in doubt*: it is re-sent as it is, with the same sequence number, before anything newer. The
  store applies each ``(writer, seq)`` at most once, so a batch is counted exactly once.

``gateway_status_pending`` is the number of updates (one per recorded postback) not yet written.
Updates still pending when the process is killed are lost; a graceful stop writes them first,
waiting up to ``CLOSE_WAIT_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping
from datetime import datetime

from gateway.errors import StatusUnavailable
from gateway.metrics import Metrics
from gateway.status import Delta, StatusRecord, StatusStore

log = logging.getLogger("gateway.status")

#: Seconds between retries while updates are pending.
RETRY_EVERY_S = 1.0

#: Longest an update noted by a postback waits before a round writes it.
FLUSH_AFTER_S = 0.05

#: Longest a read waits for this process's pending updates to be written before reading.
READ_FLUSH_S = 0.5

#: Longest a graceful stop waits to write what is pending.
CLOSE_WAIT_S = 2.0

#: More partners than any gateway loads; updates for further names are dropped (and logged), so
#: no input can grow the pending delta without bound.
MAX_PARTNERS = 1000


class BufferedStatus:
    """A :class:`~gateway.status.StatusStore` that keeps what its store could not take."""

    def __init__(
        self,
        store: StatusStore,
        metrics: Metrics | None = None,
        retry_every: float = RETRY_EVERY_S,
        flush_after: float = FLUSH_AFTER_S,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.retry_every = retry_every
        self.flush_after = flush_after
        self._flush_timer: asyncio.TimerHandle | None = None
        self._failing = False  # a round failed and nothing was written since (logged once)
        self.writer = uuid.uuid4().hex  # this process's writer id; seq counts its batches
        self._seq = 0
        self._fresh: dict[str, Delta] = {}  # merged updates not yet in any round
        self._fresh_updates = 0
        self._in_doubt: tuple[int, dict[str, Delta], int] | None = None  # (seq, batch, updates)
        self._lock = asyncio.Lock()
        self._next_round: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._retrier: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Updates recorded but not yet known to be in the store."""
        return self._fresh_updates + (self._in_doubt[2] if self._in_doubt else 0)

    # -- the StatusStore protocol ----------------------------------------------------------------

    async def open(self) -> None:
        await self.store.open()
        self._retrier = asyncio.create_task(self._retry(), name="status-retry")

    async def close(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._retrier is not None:
            self._retrier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retrier
            self._retrier = None
        if self.pending:
            with contextlib.suppress(StatusUnavailable, TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._round()), CLOSE_WAIT_S)
        for task in list(self._tasks):  # a round stuck on a hung store
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.pending:
            log.warning("status: %d update(s) not written before stopping", self.pending)
        if self.metrics is not None:
            self.metrics.status_pending.set(0)  # this process holds nothing any more
        await self.store.close()

    async def ping(self) -> None:
        await self.store.ping()

    async def get(self, partner: str) -> StatusRecord:
        """The partner's status, this process's pending updates written first (if the store
        takes them within ``READ_FLUSH_S``)."""
        if self.pending:
            with contextlib.suppress(StatusUnavailable, TimeoutError):
                async with asyncio.timeout(READ_FLUSH_S):
                    await asyncio.shield(self._round())
        return await self.store.get(partner)

    def note(
        self, partner: str, counts: Mapping[str, int], success_at: datetime | None = None
    ) -> None:
        """Add the update without waiting for it: a round writes it within ``flush_after``
        seconds. A postback is answered once its event is durable, not its status."""
        if not self._add(partner, counts, success_at):
            return
        if self._flush_timer is None and self._next_round is None:
            loop = asyncio.get_running_loop()
            self._flush_timer = loop.call_later(self.flush_after, self._flush)

    async def record(
        self, partner: str, counts: Mapping[str, int], success_at: datetime | None = None
    ) -> None:
        """Add the update, then wait for the round that writes it. Raises StatusUnavailable if
        that round fails: the update stays pending and a later round writes it. Cancelling the
        wait (a timeout) does not cancel the round."""
        if not self._add(partner, counts, success_at):
            return
        await asyncio.shield(self._round())

    async def record_batch(self, batch: Mapping[str, Delta], writer: str, seq: int) -> None:
        await self.store.record_batch(batch, writer, seq)

    # -- pending updates and write rounds --------------------------------------------------------

    def _add(self, partner: str, counts: Mapping[str, int], success_at: datetime | None) -> bool:
        delta = self._fresh.get(partner)
        if delta is None:
            if len(self._fresh) >= MAX_PARTNERS:
                log.error("status: more than %d partners pending; update dropped", MAX_PARTNERS)
                return False
            delta = self._fresh[partner] = Delta()
        for name, n in counts.items():
            if n:
                delta.counts[name] = delta.counts.get(name, 0) + n
        if success_at is not None and (delta.success_at is None or success_at > delta.success_at):
            delta.success_at = success_at
        self._fresh_updates += 1
        self._publish()
        return True

    def _round(self) -> asyncio.Task[None]:
        """The round that will write what is pending now: the next one not yet started."""
        if self._next_round is None:
            task = asyncio.create_task(self._write(), name="status-write")
            self._next_round = task
            self._tasks.add(task)
            task.add_done_callback(self._done)
            task.add_done_callback(self._flushed)
        return self._next_round

    def _flush(self) -> None:
        self._flush_timer = None
        self._round()

    def _flushed(self, task: asyncio.Task[None]) -> None:
        """Every failed round counts in ``gateway_status_errors_total``; an outage is logged
        when it starts and when it ends."""
        exc = None if task.cancelled() else task.exception()
        if exc is None:
            if self._failing and not self.pending:
                log.info("status: caught up")
            self._failing = self._failing and bool(self.pending)
            return
        if self.metrics is not None:
            self.metrics.status_errors.inc()
        if self._failing:
            return
        self._failing = True
        if isinstance(exc, StatusUnavailable):
            log.warning("status: %d update(s) pending: %s", self.pending, exc.reason)
        else:
            log.error("status: write failed", exc_info=exc)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have given up on it

    async def _write(self) -> None:
        async with self._lock:
            # From here on, new updates wait for the next round.
            self._next_round = None
            try:
                if self._in_doubt is not None:  # first what may or may not be written
                    await self._send(self._in_doubt)
                if self._fresh:
                    self._seq += 1
                    self._in_doubt = (self._seq, self._fresh, self._fresh_updates)
                    self._fresh, self._fresh_updates = {}, 0
                    await self._send(self._in_doubt)
            finally:
                self._publish()

    async def _send(self, batch: tuple[int, dict[str, Delta], int]) -> None:
        seq, deltas, _ = batch
        await self.store.record_batch(deltas, self.writer, seq)
        self._in_doubt = None  # written, or found written before (same seq)

    async def _retry(self) -> None:
        """While anything is pending, try again every ``retry_every`` seconds (failures are
        counted and logged by :meth:`_flushed`)."""
        while True:
            await asyncio.sleep(self.retry_every)
            if self.pending:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._round())

    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.status_pending.set(self.pending)
