"""``gateway replay`` and ``gateway export``: payloads through the mapping again, events out.

Replay reads stored raw payloads (JSONL, as ``gateway export`` writes it) or a partner's sample
files and takes each through exactly what a postback goes through after authentication and
reading: :meth:`Gateway.map_payloads` (the partner's mapping and the core's completion) and
:meth:`Gateway.settle` (organic and restricted filters, idempotent storage). It never records
status: a replay is not a live postback, so counters and ``last_success_at`` stay as they were.

A unit of input (a JSONL line, a sample file) that cannot be replayed is reported with where it
is and why, counted, and skipped; the run goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import IO, Any

import msgspec

from gateway import body as reader
from gateway.config import Config
from gateway.errors import GatewayError, MappingError
from gateway.events import AttributionEvent, event_encoder
from gateway.normalise import timestamp
from gateway.plugins import LoadedPartner, load_partners
from gateway.postback import Gateway, Writer
from gateway.status import Delta, StatusRecord
from gateway.storage import ReplaceResult, Storage, StoreResult, open_storage, replacement

#: Events written per storage transaction.
CHUNK_EVENTS = 500

#: Outcomes in the order a report shows them, per mode.
BACKFILL_OUTCOMES = ("accepted", "duplicate", "ignored_organic", "ignored_restricted")
UPDATE_OUTCOMES = ("accepted", "updated", "unchanged", "ignored_organic", "ignored_restricted")

_json = msgspec.json.Decoder()


class Item(msgspec.Struct):
    """One unit of input: the payloads of one JSONL line, or of one sample file."""

    where: str  # "events.jsonl:12", or a sample file's path
    partner: str
    payloads: list[dict[str, Any]]
    batch: bool = False  # a JSON array: mapped all-or-nothing, as a batch postback is
    received_at: datetime | None = None  # an exported event's own; None: now


class Failure(msgspec.Struct):
    where: str
    reason: str


# -- input -----------------------------------------------------------------------------------------


def read_jsonl(name: str, stream: Iterable[bytes]) -> Iterator[Item | Failure]:
    """Each non-blank line: an exported event (``partner`` and ``raw``, as ``GET /events`` and
    ``gateway export`` write it) or ``{"partner": …, "payload": {…}}``."""
    for number, line in enumerate(stream, 1):
        if line.strip():
            yield _line(f"{name}:{number}", line)


def _line(where: str, line: bytes) -> Item | Failure:
    try:
        data = _json.decode(line)
    except (msgspec.DecodeError, RecursionError) as exc:
        return Failure(where, f"not JSON: {exc}")
    if not isinstance(data, dict):
        return Failure(where, "not a JSON object")
    if "partner" not in data and isinstance(data.get("events"), list):
        return Failure(where, "a GET /events answer: write one event a line (jq -c '.events[]')")
    partner = data.get("partner")
    if not isinstance(partner, str) or not partner:
        return Failure(where, 'no "partner": expected an exported event or {"partner", "payload"}')
    if "payload" in data and "raw" in data:
        return Failure(where, 'both "raw" and "payload": send one of them')
    field = "payload" if "payload" in data else "raw"
    payload = data.get(field)
    if not isinstance(payload, dict):
        return Failure(where, f'"{field}" must be a JSON object (the payload to map)')
    try:
        received_at = timestamp(data.get("received_at"), "received_at")
    except GatewayError as exc:
        return Failure(where, exc.reason)
    # As the HTTP endpoint reads it: an api_key field is dropped before mapping and storing.
    return Item(where, partner, reader.merge({}, [payload]), received_at=received_at)


def read_samples(partner: str, paths: Sequence[str], max_items: int) -> Iterator[Item | Failure]:
    """Each file ("-": stdin): one postback body of ``partner`` (a JSON object, a JSON array
    batch or form-encoded fields), read as the HTTP endpoint reads a body."""
    for path in paths:
        try:
            if path == "-":
                body = sys.stdin.buffer.read()
            else:
                with open(path, "rb") as f:
                    body = f.read()
            items = reader.parse_body(body, "", max_items)
        except OSError as exc:
            yield Failure(path, exc.strerror or str(exc))
            continue
        except GatewayError as exc:
            yield Failure(path, exc.reason)
            continue
        yield Item(path, partner, reader.merge({}, items), batch=reader.is_batch(body))


# -- replay ----------------------------------------------------------------------------------------


class DryRun:
    """A writer that reads storage but never writes it: it answers as ``store`` (or ``replace``)
    would, keeping what this run would have written in memory, so that the same dedupe key met
    twice in a file is answered as it would be."""

    def __init__(self, storage: Storage, update: bool) -> None:
        self.storage = storage
        self.update = update
        self._written: dict[tuple[str, str], AttributionEvent] = {}

    async def __call__(
        self, events: Sequence[AttributionEvent]
    ) -> Sequence[StoreResult | ReplaceResult]:
        wanted: dict[str, set[str]] = {}
        for e in events:
            if (e.partner, e.dedupe_key) not in self._written:
                wanted.setdefault(e.partner, set()).add(e.dedupe_key)
        stored: dict[tuple[str, str], AttributionEvent] = {}
        for partner, keys in wanted.items():
            found = await self.storage.find(partner, sorted(keys))
            stored.update(((partner, key), event) for key, event in found.items())
        results: list[StoreResult | ReplaceResult] = []
        for e in events:
            key = (e.partner, e.dedupe_key)
            old = self._written.get(key) or stored.get(key)
            if old is None:
                self._written[key] = e
                new_result: StoreResult | ReplaceResult = StoreResult(True, e.event_id)
                results.append(ReplaceResult("stored", e.event_id) if self.update else new_result)
            elif not self.update:
                results.append(StoreResult(False, old.event_id))
            elif (new := replacement(e, old)) is None:
                results.append(ReplaceResult("unchanged", old.event_id))
            else:
                self._written[key] = new
                results.append(ReplaceResult("updated", old.event_id))
        return results


class Report(msgspec.Struct):
    lines: int = 0  # units of input read: JSONL lines, or sample files
    events: int = 0  # events mapped from them
    failed: int = 0  # units that could not be replayed
    outcomes: dict[str, int] = msgspec.field(default_factory=dict)


async def replay(
    gw: Gateway,
    items: Iterable[Item | Failure],
    *,
    update: bool = False,
    dry_run: bool = False,
    on_failure: Callable[[Failure], None] = lambda failure: None,
    on_disabled: Callable[[str], None] = lambda partner: None,
) -> Report:
    """Map and settle every item through ``gw``, CHUNK_EVENTS events per storage transaction.
    Backfill by default (a stored dedupe key is a duplicate, left alone); ``update`` rewrites
    stored events with the new mapping (``Storage.replace``); ``dry_run`` writes nothing.
    Storage errors are raised (chunks already written stay written: replaying again is safe)."""
    write: Writer = gw.storage.replace if update else gw.storage.store
    if dry_run:
        write = DryRun(gw.storage, update)
    report = Report()
    counts: Counter[str] = Counter()
    pending: list[AttributionEvent] = []
    disabled: set[str] = set()

    async def flush() -> None:
        if pending:
            counts.update((await gw.settle(pending, write))[1])
            pending.clear()

    for item in items:
        report.lines += 1
        failure = item if isinstance(item, Failure) else None
        if isinstance(item, Item):
            loaded = gw.partners.get(item.partner)
            if loaded is None:
                failure = Failure(item.where, f"unknown partner {item.partner!r}")
            else:
                if not gw.config.partner_enabled(item.partner) and item.partner not in disabled:
                    disabled.add(item.partner)
                    on_disabled(item.partner)
                try:
                    mapped = gw.map_payloads(loaded, item.payloads, item.batch, item.received_at)
                except GatewayError as exc:
                    failure = Failure(item.where, exc.reason)
                else:
                    report.events += len(mapped)
                    pending.extend(event for _, event in mapped)
        if failure is not None:
            report.failed += 1
            on_failure(failure)
        if len(pending) >= CHUNK_EVENTS:
            await flush()
    await flush()
    report.outcomes = dict(counts)
    return report


def format_report(report: Report, update: bool, dry_run: bool, unit: str = "lines") -> str:
    names = UPDATE_OUTCOMES if update else BACKFILL_OUTCOMES
    label = {"accepted": "stored"}  # "accepted" is the postback's word for a new stored event
    rows = [(unit, report.lines), ("events", report.events)]
    rows += [(label.get(n, n), report.outcomes.get(n, 0)) for n in names]
    rows.append(("failed", report.failed))
    head = ["dry run: nothing was written"] if dry_run else []
    return "\n".join(head + [f"{name:<20}{value:>8}" for name, value in rows])


class NoStatus:
    """The status store of a replay: there is none. Replay leaves status as it is; a call to
    ``record`` would be a bug, so it fails loudly."""

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def record(
        self, partner: str, counts: Mapping[str, int], success_at: datetime | None = None
    ) -> None:
        raise RuntimeError("a replay does not record status")

    async def record_batch(self, batch: Mapping[str, Delta], writer: str, seq: int) -> None:
        raise RuntimeError("a replay does not record status")

    def note(
        self, partner: str, counts: Mapping[str, int], success_at: datetime | None = None
    ) -> None:
        raise RuntimeError("a replay does not record status")

    async def get(self, partner: str) -> StatusRecord:
        return StatusRecord()


# -- export ----------------------------------------------------------------------------------------


async def export(
    storage: Storage,
    out: IO[bytes],
    partner: str | None = None,
    since: datetime | None = None,
    page: int = 500,
) -> int:
    """Stored events as JSONL, oldest first, each as ``GET /events`` shows it; only those
    received at or after ``since`` when given. Returns how many were written."""
    written = 0
    after: str | None = None
    while events := await storage.scan(partner, after, page):
        for event in events:
            if since is None or (event.received_at is not None and event.received_at >= since):
                out.write(event_encoder.encode(event) + b"\n")
                written += 1
        after = events[-1].event_id
    return written


# -- the commands ----------------------------------------------------------------------------------

REPLAY_HELP = """\
Take payloads through the partner's mapping again, as a postback would go (mapping, core
normalisation, dedupe key, organic and restricted-network filters), into the storage configured
by the environment (GATEWAY_STORAGE_URL, GATEWAY_CONFIG), for backfills and for re-mapping after
a plugin fix.

Input: JSONL files ("-" for stdin), one object a line: an event as `gateway export` and
GET /events write it (its "partner" and "raw" are used, and its "received_at" is kept), or
{"partner": "...", "payload": {...}}. With --partner P, each FILE is instead one postback body
of partner P, read as the endpoint reads a body: a sample file (plugins/P/samples/*.json or
*.query), a JSON array being a batch.

By default (backfill) events whose dedupe key is stored are duplicates and left alone; new ones
are stored with a new event_id. --update re-maps: a stored event with the same dedupe key is
rewritten with the new mapping and keeps its event_id and received_at. An event the new mapping
makes organic or restricted is ignored, and a stored one is left as it is.

Replay is not a live postback: it does not touch partner status (counters and last_success_at
stay as they are; no Redis is needed). Lines that cannot be replayed (not JSON, unknown partner,
mapping error) are reported on stderr with their line number and reason and skipped. Counts per
outcome are printed at the end. Exit status: 0 when every line was replayed, 1 when any failed
(or storage became unavailable: replaying the same file again is safe), 2 for usage errors."""

EXPORT_HELP = """\
Write stored events as JSONL on stdout, oldest first, one event a line as GET /events shows it
(with its raw payload), from the storage configured by the environment. `gateway replay` reads
this format back: export → replay on a fresh database reproduces the events (new event ids)."""


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``gateway replay`` and ``gateway export``, on the CLI's subcommand parser."""
    form = argparse.RawDescriptionHelpFormatter
    replay_p = sub.add_parser(
        "replay",
        help="map stored raw payloads (JSONL) or sample files again (backfill, re-map)",
        description=REPLAY_HELP,
        formatter_class=form,
    )
    replay_p.add_argument("files", nargs="+", metavar="FILE", help='JSONL file, or "-" for stdin')
    replay_p.add_argument(
        "--partner",
        metavar="P",
        help="each FILE is one postback body of partner P (a sample file), not JSONL",
    )
    replay_p.add_argument(
        "--update",
        action="store_true",
        help="re-map: rewrite stored events that have the same dedupe key (keeping their "
        "event_id and received_at) instead of leaving them as duplicates",
    )
    replay_p.add_argument(
        "--dry-run", action="store_true", help="map and report what would happen; write nothing"
    )
    export_p = sub.add_parser(
        "export", help="stored events as JSONL on stdout", description=EXPORT_HELP
    )
    export_p.add_argument("--partner", metavar="P", help="only this partner's events")
    export_p.add_argument(
        "--since",
        metavar="TIME",
        help="only events received at or after TIME (ISO-8601; no zone means UTC)",
    )


def _unknown_partner(name: str, partners: Mapping[str, LoadedPartner]) -> int:
    known = ", ".join(sorted(partners)) or "none"
    print(f"gateway: unknown partner {name!r} (known: {known})", file=sys.stderr)
    return 2


def replay_command(config: Config, args: argparse.Namespace) -> int:
    partners = load_partners()
    if args.partner is not None and args.partner not in partners:
        return _unknown_partner(args.partner, partners)
    if args.files.count("-") > 1:
        print('gateway: "-" (stdin) may be given once', file=sys.stderr)
        return 2
    missing = [f for f in args.files if f != "-" and not os.path.isfile(f)]
    if missing:
        print(f"gateway: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2

    def items() -> Iterator[Item | Failure]:
        for name in args.files:
            if args.partner is not None:
                yield from read_samples(args.partner, [name], config.limits.max_batch_events)
            elif name == "-":
                yield from read_jsonl("<stdin>", sys.stdin.buffer)
            else:
                with open(name, "rb") as stream:
                    yield from read_jsonl(name, stream)

    def failed(failure: Failure) -> None:
        print(f"{failure.where}: {failure.reason}", file=sys.stderr, flush=True)

    def disabled(partner: str) -> None:
        print(f"note: partner {partner!r} is disabled in config; replaying it", file=sys.stderr)

    async def run() -> Report:
        storage = open_storage(config.storage.url)
        await storage.open()
        try:
            gw = Gateway(config, partners, storage, NoStatus())
            return await replay(
                gw,
                items(),
                update=args.update,
                dry_run=args.dry_run,
                on_failure=failed,
                on_disabled=disabled,
            )
        finally:
            await storage.close()

    try:
        report = asyncio.run(run())
    except GatewayError as exc:
        print(
            f"gateway: {exc.reason}; stopped (what was written stays written, and replaying the"
            " same input again is safe)",
            file=sys.stderr,
        )
        return 1
    unit = "lines" if args.partner is None else "files"
    print(format_report(report, args.update, args.dry_run, unit))
    return 1 if report.failed else 0


def export_command(config: Config, args: argparse.Namespace) -> int:
    partners = load_partners()
    if args.partner is not None and args.partner not in partners:
        return _unknown_partner(args.partner, partners)
    since = None
    if args.since is not None:
        try:
            since = timestamp(args.since, "--since")
        except MappingError as exc:
            print(f"gateway: {exc.reason}", file=sys.stderr)
            return 2

    async def run() -> int:
        storage = open_storage(config.storage.url)
        await storage.open()
        try:
            written = await export(storage, sys.stdout.buffer, args.partner, since)
        finally:
            await storage.close()
        sys.stdout.buffer.flush()
        return written

    written = asyncio.run(run())
    print(f"exported {written} event(s)", file=sys.stderr)
    return 0
