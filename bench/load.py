"""The load generator: a realistic mix of every partner's samples, posted over keep-alive
HTTP/1.1 connections by a small asyncio client (raw streams, no HTTP library).

Each request is one of the partners' own samples (``plugins/<partner>/samples``), with the
partner's id field (or, for partners whose dedupe key is a hash of the payload, an extra
``bench_seq`` field) made unique, so every attributed postback is new and accepted, never a
duplicate. ``.json`` samples are POSTed as JSON, ``.query`` samples are sent as a GET with the
fields in the query string, as those partners do; the key always travels as ``?api_key=``.

The client is a closed loop: ``connections`` connections, each sending its next request as soon
as the answer to the last one arrived (like wrk). It records every request's latency and answer.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parent.parent
PARTNERS = ("kochava", "appsflyer", "adjust", "branch", "singular", "tune")

#: The partner's own event id, where its dedupe key is that id (else the payload's hash is the
#: key and an extra field makes each postback distinct).
ID_FIELDS: dict[str, str] = {"kochava": "transaction_id", "branch": "id"}

#: Stands for the request's sequence number in a template; items of a batch get ``<seq>-<i>``.
MARK = "BENCHSEQ"


@dataclass(frozen=True)
class Template:
    """One sample as a request with a hole (or several) for the sequence number."""

    partner: str
    sample: str
    method: str
    target: list[bytes]  # request target, split at the marks
    body: list[bytes]  # body, split at the marks ([b""] for none)
    content_type: str | None
    events: int  # items in the body (a batch holds several)

    def render(self, seq: bytes, host: bytes) -> bytes:
        target = seq.join(self.target)
        body = seq.join(self.body)
        head = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (self.method.encode(), target, host)]
        if self.content_type is not None:
            head.append(b"Content-Type: %s\r\n" % self.content_type.encode())
        if self.method == "POST":
            head.append(b"Content-Length: %d\r\n" % len(body))
        head.append(b"\r\n")
        return b"".join(head) + body


def _marked(partner: str, item: dict[str, Any], index: int | None) -> dict[str, Any]:
    mark = MARK if index is None else f"{MARK}-{index}"
    out = dict(item)
    id_field = ID_FIELDS.get(partner)
    if id_field is not None and id_field in out:
        out[id_field] = mark
    else:
        out["bench_seq"] = mark
    return out


def templates(keys: Mapping[str, str], root: Path = ROOT) -> list[Template]:
    """One template per sample of each partner in ``keys`` (partner → API key)."""
    out: list[Template] = []
    for partner in keys:
        folder = root / "plugins" / partner / "samples"
        quoted_key = urllib.parse.quote(keys[partner], safe="")
        path = f"/partners/{partner}/postback?api_key={quoted_key}"
        for sample in sorted(folder.iterdir()):
            if sample.suffix == ".json":
                data = msgspec.json.decode(sample.read_bytes())
                if isinstance(data, list):
                    marked: Any = [_marked(partner, d, i) for i, d in enumerate(data)]
                    events = len(data)
                else:
                    marked, events = _marked(partner, data, None), 1
                body = msgspec.json.encode(marked)
                out.append(
                    Template(
                        partner,
                        sample.name,
                        "POST",
                        [path.encode()],
                        body.split(MARK.encode()),
                        "application/json",
                        events,
                    )
                )
            elif sample.suffix == ".query":
                fields = dict(
                    urllib.parse.parse_qsl(sample.read_text().strip(), keep_blank_values=True)
                )
                query = urllib.parse.urlencode(_marked(partner, fields, None))
                out.append(
                    Template(
                        partner,
                        sample.name,
                        "GET",
                        f"{path}&{query}".encode().split(MARK.encode()),
                        [b""],
                        None,
                        1,
                    )
                )
    return out


def mix(all_templates: list[Template]) -> Iterator[Template]:
    """Every partner in turn (an even share each), cycling through each partner's samples."""
    by_partner: dict[str, list[Template]] = {}
    for t in all_templates:
        by_partner.setdefault(t.partner, []).append(t)
    cycles = [itertools.cycle(ts) for ts in by_partner.values()]
    for cycle in itertools.cycle(cycles):
        yield next(cycle)


@dataclass
class Tally:
    """What the client saw."""

    latencies_ns: list[int] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    accepted_events: int = 0  # events the server said it accepted (stored)
    duplicates: int = 0  # events answered duplicate: must stay 0 with unique ids
    errors: Counter[str] = field(default_factory=Counter)  # connection failures and the like
    per_partner: Counter[str] = field(default_factory=Counter)  # requests answered
    accepted_by_partner: Counter[str] = field(default_factory=Counter)
    accepted_ids: set[str] = field(default_factory=set)  # event ids the answers named accepted

    @property
    def requests(self) -> int:
        return len(self.latencies_ns)


_answer = msgspec.json.Decoder()


def count_answer(tally: Tally, partner: str, status: int, body: bytes) -> None:
    """Accepted events from a 202 answer: 1 for a single postback, ``accepted`` for a batch."""
    tally.statuses[status] += 1
    tally.per_partner[partner] += 1
    if status not in (200, 202):
        return
    try:
        data = _answer.decode(body)
    except msgspec.DecodeError:
        tally.errors["unreadable answer"] += 1
        return
    if not isinstance(data, dict):
        tally.errors["unreadable answer"] += 1
        return
    accepted = 0
    if "accepted" in data and isinstance(data["accepted"], int):  # a batch
        accepted = data["accepted"]
        tally.duplicates += int(data.get("duplicate", 0))
        for result in data.get("results", ()):
            if isinstance(result, dict) and result.get("status") == "accepted":
                tally.accepted_ids.add(str(result.get("event_id")))
    elif data.get("status") == "accepted":
        accepted = 1
        tally.accepted_ids.add(str(data.get("event_id")))
    elif data.get("status") == "duplicate":
        tally.duplicates += 1
    tally.accepted_events += accepted
    tally.accepted_by_partner[partner] += accepted


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
            break
    body = await reader.readexactly(length) if length else b""
    return status, body


async def run_load(
    host: str,
    port: int,
    all_templates: list[Template],
    connections: int = 32,
    duration: float = 10.0,
    requests: int | None = None,
    run_id: str | None = None,
    start_seq: int = 0,
    tally: Tally | None = None,
) -> tuple[Tally, float]:
    """Send the mix for ``duration`` seconds, or until ``requests`` have been answered. Returns
    what was seen (in ``tally`` when given, which others may watch meanwhile) and the seconds
    it took."""
    tally = Tally() if tally is None else tally
    source = mix(all_templates)
    run_id = run_id or secrets.token_hex(4)
    seq = itertools.count(start_seq)
    host_header = f"{host}:{port}".encode()
    budget = itertools.count() if requests is None else iter(range(requests))
    started = time.perf_counter()
    deadline = started + duration if requests is None else float("inf")

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < deadline and next(budget, None) is not None:
                template = next(source)
                request = template.render(f"{run_id}{next(seq)}".encode(), host_header)
                sent = time.perf_counter_ns()
                writer.write(request)
                try:
                    status, body = await _read_answer(reader)
                except (asyncio.IncompleteReadError, ConnectionError) as exc:
                    tally.errors[type(exc).__name__] += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                tally.latencies_ns.append(time.perf_counter_ns() - sent)
                count_answer(tally, template.partner, status, body)
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return tally, time.perf_counter() - started


def percentile(sorted_values: list[int], q: float) -> float:
    """The q-th percentile (0..100) by the nearest-rank method."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))
    return float(sorted_values[int(rank) - 1])
