"""A downstream consumer of the gateway's event stream, to copy and adapt.

The gateway publishes every accepted event to a Redis Stream (``[publish]`` in its config),
at least once: an event may appear twice in the stream (a publisher that stopped between
publishing and noting it), never zero times. This consumer turns that into exactly-once effects:

- it reads as one member of a consumer group (XREADGROUP), so several copies of it share the work
  and each entry goes to one of them;
- its effect is idempotent on ``event_id``: here, an ``INSERT … ON CONFLICT DO NOTHING`` into a
  SQLite table whose primary key is ``event_id``, committed before the entry is acknowledged
  (XACK). A crash between the two only means the entry comes again, and is skipped;
- entries a consumer read and never acknowledged (it died) are claimed by another after
  ``--claim-idle-ms`` (XAUTOCLAIM); this consumer's own unacknowledged entries are read again
  when it restarts under the same ``--consumer`` name.

Replace :func:`handle` with your own effect, keeping it idempotent on ``event_id`` (a unique key
in your database, an upsert, a "seen" set with the effect in the same transaction).

Usage::

    python examples/stream_consumer.py --redis-url redis://127.0.0.1:6379/0 \\
        --stream gateway:events --group warehouse --consumer "$(hostname)" --sink consumed.db

``--until-idle SECONDS`` exits once nothing has arrived for that long (for batch runs and tests);
without it the consumer runs until SIGINT/SIGTERM. At exit it prints one JSON line of counts.
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import sys
import time
from collections.abc import Sequence
from typing import Any

import redis

#: Entries per read.
COUNT = 100
#: Milliseconds a read waits for new entries.
BLOCK_MS = 1000
#: Seconds between looks for entries that dead consumers left unacknowledged.
CLAIM_EVERY_S = 30.0

SINK_SCHEMA = """
CREATE TABLE IF NOT EXISTS consumed (
    event_id    TEXT PRIMARY KEY,
    partner     TEXT NOT NULL,
    kind        TEXT NOT NULL,
    stream_id   TEXT NOT NULL,
    event       TEXT NOT NULL
)
"""

Entry = tuple[bytes, dict[bytes, bytes]]


def handle(sink: sqlite3.Connection, stream_id: str, fields: dict[bytes, bytes]) -> bool:
    """The effect of one entry, idempotent on event_id: True if new, False if seen already."""
    event = json.loads(fields[b"event"])
    event_id = fields[b"event_id"].decode()
    if event.get("event_id") != event_id:
        raise ValueError(f"entry {stream_id}: event_id field and event disagree")
    with sink:  # one transaction: the effect and the record that it happened
        cur = sink.execute(
            "INSERT INTO consumed (event_id, partner, kind, stream_id, event)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING",
            (event_id, event["partner"], event["kind"], stream_id, json.dumps(event)),
        )
    return cur.rowcount == 1


class Consumer:
    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        group: str,
        consumer: str,
        sink: sqlite3.Connection,
        claim_idle_ms: int,
    ) -> None:
        self.client = client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.sink = sink
        self.claim_idle_ms = claim_idle_ms
        self.counts = {"processed": 0, "duplicates": 0, "claimed": 0, "malformed": 0, "trimmed": 0}
        self.stopping = False

    def ensure_group(self) -> None:
        """Create the group (reading the stream from its start) unless it exists."""
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def process(self, entries: Sequence[Entry]) -> None:
        for raw_id, fields in entries:
            stream_id = raw_id.decode()
            if not fields:  # a pending entry trimmed from the stream (maxlen) before it was read
                print(f"entry {stream_id} was trimmed away unread", file=sys.stderr)
                self.counts["trimmed"] += 1
                self.client.xack(self.stream, self.group, raw_id)
                continue
            try:
                new = handle(self.sink, stream_id, fields)
            except (KeyError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
                # Never processable: set aside (here, only reported) rather than retried forever.
                print(f"skipping malformed entry {stream_id}: {exc}", file=sys.stderr)
                self.counts["malformed"] += 1
            else:
                self.counts["processed" if new else "duplicates"] += 1
            # Acknowledged only once the effect is committed.
            self.client.xack(self.stream, self.group, raw_id)

    def own_pending(self) -> None:
        """Entries delivered to this consumer name before a restart and never acknowledged."""
        while not self.stopping:
            reply = self.client.xreadgroup(
                self.group, self.consumer, {self.stream: "0"}, count=COUNT
            )
            entries = reply[0][1] if reply else []
            if not entries:
                return
            self.process(entries)

    def claim_stale(self) -> None:
        """Take over entries other consumers read more than claim_idle_ms ago, unacknowledged."""
        start = "0-0"
        while not self.stopping:
            next_start, entries, deleted = self.client.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                min_idle_time=self.claim_idle_ms,
                start_id=start,
                count=COUNT,
            )
            self.counts["claimed"] += len(entries)
            self.process(entries)
            if deleted:  # trimmed from the stream before anyone acknowledged them
                print(f"{len(deleted)} pending entries were trimmed away", file=sys.stderr)
                self.counts["trimmed"] += len(deleted)
                self.client.xack(self.stream, self.group, *deleted)
            start = next_start.decode() if isinstance(next_start, bytes) else str(next_start)
            if start == "0-0":
                return

    def run(self, until_idle: float | None = None) -> dict[str, int]:
        self.ensure_group()
        self.own_pending()
        self.claim_stale()
        last_claim = last_new = time.monotonic()
        while not self.stopping:
            if time.monotonic() - last_claim >= CLAIM_EVERY_S:
                self.claim_stale()
                last_claim = time.monotonic()
            reply = self.client.xreadgroup(
                self.group, self.consumer, {self.stream: ">"}, count=COUNT, block=BLOCK_MS
            )
            entries = reply[0][1] if reply else []
            if entries:
                self.process(entries)
                last_new = time.monotonic()
            elif until_idle is not None and time.monotonic() - last_new >= until_idle:
                claimed = self.counts["claimed"]
                self.claim_stale()  # a last look: a dead consumer's entries may be due now
                if self.counts["claimed"] == claimed:
                    break
                last_new = time.monotonic()
        return self.counts


def open_sink(path: str) -> sqlite3.Connection:
    sink = sqlite3.connect(path, isolation_level=None)
    sink.execute("PRAGMA journal_mode = WAL")
    sink.execute(SINK_SCHEMA)
    sink.isolation_level = "DEFERRED"  # `with sink:` commits or rolls back
    return sink


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--stream", default="gateway:events")
    parser.add_argument("--group", default="consumers")
    parser.add_argument("--consumer", required=True, help="this consumer's name in the group")
    parser.add_argument("--sink", default="consumed.db", help="SQLite file the events go to")
    parser.add_argument("--claim-idle-ms", type=int, default=60_000)
    parser.add_argument("--until-idle", type=float, help="exit after this long with nothing new")
    args = parser.parse_args(argv)

    client = redis.Redis.from_url(args.redis_url)
    sink = open_sink(args.sink)
    consumer = Consumer(client, args.stream, args.group, args.consumer, sink, args.claim_idle_ms)

    def stop(*_: Any) -> None:
        consumer.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        counts = consumer.run(args.until_idle)
    finally:
        sink.close()
        client.close()
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
