"""Retention: stored events lose their raw payload, and their device ids, after N days.

``[retention] raw_payload_days = N`` removes the ``raw`` payload (everything the partner sent:
IP addresses, user agents, ids the mapping does not keep) from events received more than N days
ago; ``device_ids_days`` removes their device ids (:data:`~gateway.events.DEVICE_ID_FIELDS`).
The mapped attribution (partner, kind, source, campaign, ad group, ad, times, app, platform,
country, revenue, dedupe key) and the user ids (``braze_id``, ``external_id``) stay as long as
the event. 0 keeps them (the default).

Every gateway process purges once a while after it starts, then every :data:`PURGE_EVERY_S`
seconds; ``gateway purge`` does it at once. Purging is idempotent and processes may purge at
the same time: each event records what has been removed from it, so a run touches only events
that have newly come of age (or were re-mapped since with ``gateway replay --update``, which
brings a raw payload back). An event whose raw payload is gone cannot be re-mapped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from gateway.config import Config, RetentionConfig
from gateway.errors import StorageUnavailable
from gateway.storage import Purged, Storage, open_storage

if TYPE_CHECKING:
    from gateway.postback import Gateway

log = logging.getLogger("gateway.retention")

#: Seconds between two purges in a running gateway.
PURGE_EVERY_S = 3600.0
#: Seconds after start before the first purge (times 0.5 to 1.5, so workers spread out).
FIRST_PURGE_AFTER_S = 60.0


def cutoffs(
    retention: RetentionConfig, now: datetime | None = None
) -> tuple[datetime | None, datetime | None]:
    """The receive times before which raw payloads / device ids go (None: kept)."""
    now = now or datetime.now(UTC)

    def before(days: int) -> datetime | None:
        return now - timedelta(days=days) if days > 0 else None

    return before(retention.raw_payload_days), before(retention.device_ids_days)


async def purge(
    storage: Storage, retention: RetentionConfig, now: datetime | None = None
) -> Purged:
    """Apply ``retention`` to stored events, as of ``now``."""
    raw_before, ids_before = cutoffs(retention, now)
    if raw_before is None and ids_before is None:
        return Purged()
    return await storage.purge(raw_before, ids_before)


def _report(done: Purged) -> str:
    return (
        f"raw payload removed from {done.raw} event(s), "
        f"device ids removed from {done.device_ids} event(s)"
    )


# -- in the gateway -------------------------------------------------------------------------------


async def _every_hour(gw: Gateway) -> None:
    delay = FIRST_PURGE_AFTER_S * random.uniform(0.5, 1.5)
    while True:
        await asyncio.sleep(delay)
        delay = PURGE_EVERY_S
        retention = gw.config.retention  # read each time: a config reload applies
        try:
            done = await purge(gw.storage, retention)
        except StorageUnavailable as exc:
            gw.metrics.storage_errors.inc()
            log.warning("retention: purge failed, tried again in %ss: %s", delay, exc.reason)
        except Exception:
            log.exception("retention: purge failed, tried again in %ss", delay)
        else:
            if done.raw or done.device_ids:
                log.info("retention: %s", _report(done))


@asynccontextmanager
async def retention_job(gw: Gateway) -> AsyncIterator[None]:
    """For the app's lifespan: the periodic purge runs while the app runs."""
    task = asyncio.create_task(_every_hour(gw), name="retention")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- gateway purge --------------------------------------------------------------------------------


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    purge_cmd = sub.add_parser(
        "purge", help="apply [retention] now: remove old raw payloads and device ids"
    )
    purge_cmd.add_argument(
        "--raw-payload-days",
        type=int,
        metavar="N",
        help="remove raw payloads of events older than N days (default: from config)",
    )
    purge_cmd.add_argument(
        "--device-ids-days",
        type=int,
        metavar="N",
        help="remove device ids of events older than N days (default: from config)",
    )


def purge_command(config: Config, args: argparse.Namespace) -> int:
    retention = RetentionConfig(
        raw_payload_days=config.retention.raw_payload_days,
        device_ids_days=config.retention.device_ids_days,
    )
    if args.raw_payload_days is not None:
        retention.raw_payload_days = args.raw_payload_days
    if args.device_ids_days is not None:
        retention.device_ids_days = args.device_ids_days
    if min(retention.raw_payload_days, retention.device_ids_days) < 0:
        print("gateway: days must be 0 (keep) or more", file=sys.stderr)
        return 2
    if not retention.raw_payload_days and not retention.device_ids_days:
        print(
            "Nothing to purge: retention.raw_payload_days and retention.device_ids_days are 0 "
            "(keep). Set them in the config file, or pass --raw-payload-days N."
        )
        return 0

    async def run() -> Purged:
        storage = open_storage(config.storage.url)
        await storage.open()
        try:
            return await purge(storage, retention)
        finally:
            await storage.close()

    print(f"Purged: {_report(asyncio.run(run()))}.")
    return 0
