"""The conformance kit: the promises every partner plugin keeps, checked on the partner itself.

Run it with ``gateway conformance [PARTNER …]`` (third-party partners too, once allowed in
``GATEWAY_PLUGINS``); the main test suite runs it over every partner in the tree. Each check
raises :class:`BrokenPromise` naming the promise, the partner and what went wrong.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from gateway import body as reader
from gateway.errors import MappingError
from gateway.events import ID_FIELDS, TIME_FIELDS, AttributionEvent
from gateway.normalise import device_id
from gateway.plugins import LoadedPartner
from gateway.postback import map_payload

#: How many garbage payloads the fuzz check feeds a mapping.
FUZZ_CASES = 400


class BrokenPromise(AssertionError):
    def __init__(self, promise: str, partner: str, detail: str) -> None:
        super().__init__(f"partner {partner!r} breaks the promise {promise!r}: {detail}")
        self.promise = promise
        self.partner = partner


class Sample:
    """One sample postback of a partner: its payload and how it is sent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = path.name
        self.method = "GET" if path.suffix == ".query" else "POST"
        self.organic = "organic" in path.stem
        raw = path.read_bytes()
        self.body = b"" if self.method == "GET" else raw
        self.query = raw.decode("utf-8").strip() if self.method == "GET" else ""
        items = reader.parse_body(self.body, "application/json", max_items=10_000)
        self.payloads = reader.merge(reader.parse_query(self.query), items)


def samples(partner: LoadedPartner) -> list[Sample]:
    folder = Path(partner.spec.samples) if partner.spec.samples else None
    if folder is None or not folder.is_dir():
        raise BrokenPromise("has_samples", partner.spec.name, "PartnerSpec.samples is no folder")
    found = [Sample(p) for p in sorted(folder.iterdir()) if p.suffix in (".json", ".query")]
    if not found:
        raise BrokenPromise("has_samples", partner.spec.name, f"no *.json or *.query in {folder}")
    if not any(s.organic for s in found) or all(s.organic for s in found):
        raise BrokenPromise(
            "has_samples", partner.spec.name, "needs an organic sample and an attributed one"
        )
    return found


def _map_sample(partner: LoadedPartner, sample: Sample, promise: str) -> list[AttributionEvent]:
    events: list[AttributionEvent] = []
    for payload in sample.payloads:
        try:
            events.extend(map_payload(partner.spec, payload))
        except Exception as exc:
            raise BrokenPromise(
                promise, partner.spec.name, f"{sample.name} does not map: {exc!r}"
            ) from exc
    if not events:
        raise BrokenPromise(promise, partner.spec.name, f"{sample.name} maps to no event")
    return events


# -- the promises -------------------------------------------------------------------------------


def maps_its_samples(partner: LoadedPartner) -> None:
    """Every sample maps to at least one event, with a kind and an event name."""
    for sample in samples(partner):
        for event in _map_sample(partner, sample, "maps_its_samples"):
            if not event.event_name:
                raise BrokenPromise(
                    "maps_its_samples", partner.spec.name, f"{sample.name}: empty event_name"
                )


def organic_samples_are_organic(partner: LoadedPartner) -> None:
    """Samples named ``*organic*`` map to ``attributed = False``, the others to True."""
    for sample in samples(partner):
        for event in _map_sample(partner, sample, "organic_samples_are_organic"):
            if event.attributed == sample.organic:
                raise BrokenPromise(
                    "organic_samples_are_organic",
                    partner.spec.name,
                    f"{sample.name} maps to attributed={event.attributed}",
                )


def only_input_errors(partner: LoadedPartner, cases: int = FUZZ_CASES, seed: int = 0) -> None:
    """Garbage in raises MappingError (a 422) or maps; never any other exception."""
    rng = random.Random(f"{partner.spec.name}:{seed}")
    bases = [p for s in samples(partner) for p in s.payloads]
    for payload in _garbage(rng, bases, cases):
        try:
            map_payload(partner.spec, payload)
        except MappingError:
            continue
        except Exception as exc:
            shown = repr(payload)
            shown = shown if len(shown) < 300 else shown[:300] + "…"
            raise BrokenPromise(
                "only_input_errors",
                partner.spec.name,
                f"raised {type(exc).__name__}: {exc} on {shown}",
            ) from exc


def stable_dedupe_key(partner: LoadedPartner) -> None:
    """The same postback, mapped twice (a retry), gets the same dedupe key."""
    for sample in samples(partner):
        first = [e.dedupe_key for e in _map_sample(partner, sample, "stable_dedupe_key")]
        again = [e.dedupe_key for e in _map_sample(partner, sample, "stable_dedupe_key")]
        if first != again:
            raise BrokenPromise(
                "stable_dedupe_key",
                partner.spec.name,
                f"{sample.name} gave {first} then {again}",
            )


def distinct_dedupe_keys(partner: LoadedPartner) -> None:
    """Distinct samples (distinct events) get distinct dedupe keys."""
    seen: dict[str, str] = {}
    for sample in samples(partner):
        for event in _map_sample(partner, sample, "distinct_dedupe_keys"):
            if event.dedupe_key in seen:
                raise BrokenPromise(
                    "distinct_dedupe_keys",
                    partner.spec.name,
                    f"{sample.name} and {seen[event.dedupe_key]} share {event.dedupe_key!r}",
                )
            seen[event.dedupe_key] = sample.name


def utc_times(partner: LoadedPartner) -> None:
    """The mapping's times are timezone-aware UTC (use gateway.normalise.timestamp)."""
    for sample, event in _raw_events(partner, "utc_times"):
        for field in TIME_FIELDS:
            value = getattr(event, field)
            if value is not None and (value.tzinfo is None or value.utcoffset() != timedelta(0)):
                raise BrokenPromise(
                    "utc_times", partner.spec.name, f"{sample.name}: {field} is {value!r}"
                )


def normalised_ids(partner: LoadedPartner) -> None:
    """The mapping's ids are normalised (use gateway.normalise.device_id): stripped, and
    empty or all-zero ids are None."""
    for sample, event in _raw_events(partner, "normalised_ids"):
        for field in ID_FIELDS:
            value = getattr(event, field)
            if value is not None and device_id(value, field) != value:
                raise BrokenPromise(
                    "normalised_ids", partner.spec.name, f"{sample.name}: {field} is {value!r}"
                )


def http_round_trip(partner: LoadedPartner) -> None:
    """Through HTTP with a real key and storage: each attributed sample answers 202 accepted and
    a retry 200 duplicate; each organic sample answers 200 ignored and is not stored."""
    with tempfile.TemporaryDirectory(prefix="gateway-conformance-") as tmp:
        _round_trip(partner, Path(tmp))


CHECKS: dict[str, Callable[[LoadedPartner], None]] = {
    "maps_its_samples": maps_its_samples,
    "organic_samples_are_organic": organic_samples_are_organic,
    "only_input_errors": only_input_errors,
    "stable_dedupe_key": stable_dedupe_key,
    "distinct_dedupe_keys": distinct_dedupe_keys,
    "utc_times": utc_times,
    "normalised_ids": normalised_ids,
    "http_round_trip": http_round_trip,
}


def check_partner(partner: LoadedPartner) -> list[BrokenPromise]:
    """Every check on one partner; the promises it breaks (empty when it conforms)."""
    broken = []
    for check in CHECKS.values():
        try:
            check(partner)
        except BrokenPromise as exc:
            broken.append(exc)
    return broken


# -- helpers ------------------------------------------------------------------------------------


def _raw_events(partner: LoadedPartner, promise: str) -> Iterator[tuple[Sample, AttributionEvent]]:
    """What the plugin itself returns, before the core normalises it."""
    for sample in samples(partner):
        for payload in sample.payloads:
            try:
                mapped = partner.spec.map(payload)
            except Exception as exc:
                raise BrokenPromise(
                    promise, partner.spec.name, f"{sample.name} does not map: {exc!r}"
                ) from exc
            events = [mapped] if isinstance(mapped, AttributionEvent) else list(mapped)
            for event in events:
                yield sample, event


_JUNK: list[Any] = [
    None,
    "",
    " ",
    "0",
    "00000000-0000-0000-0000-000000000000",
    "null",
    "{idfa}",
    "true",
    "maybe",
    "2024-13-45 25:61:61",
    "1e309",
    "-0",
    "NaN",
    "\x00",
    "\ud7ff\ufffd",
    "夏のセール 🎉",
    "x" * 10_000,
    0,
    -1,
    1,
    2**70,
    10**400,
    1e308,
    -0.0,
    True,
    False,
    [],
    [1, "a", None],
    {},
    {"a": {"b": [1, {"c": None}]}},
]


def _junk(rng: random.Random) -> Any:
    if rng.random() < 0.2:
        return "".join(chr(rng.randrange(1, 0xD7FF)) for _ in range(rng.randrange(1, 40)))
    return rng.choice(_JUNK)


def _garbage(
    rng: random.Random, bases: list[dict[str, Any]], cases: int
) -> Iterator[dict[str, Any]]:
    """Payloads a broken or hostile sender could produce: samples with fields replaced by junk of
    every JSON type, dropped or added, and dicts of random junk."""
    yield {}
    for _ in range(cases):
        if bases and rng.random() < 0.8:
            payload = dict(rng.choice(bases))
            for key in rng.sample(sorted(payload), k=min(len(payload), rng.randrange(1, 6))):
                if rng.random() < 0.2:
                    del payload[key]
                else:
                    payload[key] = _junk(rng)
        else:
            payload = {}
        for _ in range(rng.randrange(0, 3)):
            payload[str(_junk(rng))[:50]] = _junk(rng)
        yield payload


def _round_trip(partner: LoadedPartner, tmp: Path) -> None:
    from litestar.testing import TestClient

    from gateway.app import create_app
    from gateway.config import Config, PartnerConfig, StorageConfig
    from gateway.keys import create_key, key_secret
    from gateway.storage import open_storage

    name = partner.spec.name
    admin = secrets.token_urlsafe(16)
    config = Config(
        data_dir=str(tmp),
        admin_token=admin,
        storage=StorageConfig(url=f"sqlite:///{tmp}/gateway.db"),
        partners={name: PartnerConfig(enabled=True)},
    )

    async def make_key() -> str:
        storage = open_storage(config.storage.url)
        await storage.open()
        try:
            return (await create_key(storage, name, key_secret(config)))[1]
        finally:
            await storage.close()

    key = asyncio.run(make_key())
    url = f"/partners/{name}/postback"
    with TestClient(create_app(config, {name: partner})) as client:
        for sample in samples(partner):
            if sample.method not in partner.spec.methods:
                raise BrokenPromise(
                    "http_round_trip",
                    name,
                    f"{sample.name} is sent by {sample.method}, "
                    f"which the partner does not accept ({partner.spec.methods})",
                )
            query = f"{sample.query}&{urlencode({'api_key': key})}".lstrip("&")
            for attempt in ("first", "retry"):
                r = client.request(sample.method, f"{url}?{query}", content=sample.body)
                got = (r.status_code, r.json().get("status"))
                if sample.organic:
                    want = (200, "ignored")
                elif attempt == "first":
                    want = (202, "accepted")
                else:
                    want = (200, "duplicate")
                if got != want:
                    raise BrokenPromise(
                        "http_round_trip",
                        name,
                        f"{sample.name} ({attempt}) answered {r.status_code} {r.text[:300]}",
                    )
        stored = client.get(
            f"/events?partner={name}&limit=1000", headers={"Authorization": f"Bearer {admin}"}
        ).json()["events"]
    expected = sum(1 for s in samples(partner) if not s.organic)
    if len(stored) < expected:
        raise BrokenPromise("http_round_trip", name, f"stored {len(stored)} of {expected} events")
    for event in stored:
        received = datetime.fromisoformat(event["received_at"])
        if received.utcoffset() != timedelta(0) or received > datetime.now(UTC):
            raise BrokenPromise("http_round_trip", name, f"bad received_at {received}")
