"""Property-based tests of every loaded partner's mapping, completed by the core
(``gateway.postback.map_payload``): payloads built from the partner's own samples with fields
replaced by arbitrary JSON values, removed or added, and arbitrary dicts. The only exception
allowed is a gateway error (MappingError, answered 422); every event that comes out keeps the
core's promises (DESIGN.md §5): times in UTC, ids never all-zero or blank, text stripped, the
key never stored, a dedupe key that a retry reproduces, and it survives storage's encoding."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, get_args

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import body as reader
from gateway.conformance import samples
from gateway.errors import GatewayError
from gateway.events import (
    ID_FIELDS,
    TEXT_FIELDS,
    TIME_FIELDS,
    AttributionEvent,
    EventKind,
    event_decoder,
    event_encoder,
)
from gateway.plugins import LoadedPartner, load_partners
from gateway.postback import MAX_DEDUPE_KEY, map_payload
from tests.hostile import any_text, deep_values, examples, json_objects, json_values, plausible

PARTNERS = load_partners()
RECEIVED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
ZERO_ID = re.compile(r"^[0\-]+$")
NULL_WORDS = {"null", "none", "nil", "undefined", "(null)", "unknown", "n/a"}


def sample_payloads(partner: LoadedPartner) -> list[dict[str, Any]]:
    return [payload for sample in samples(partner) for payload in sample.payloads]


def known_fields(partner: LoadedPartner) -> list[str]:
    return sorted({name for payload in sample_payloads(partner) for name in payload})


@st.composite
def mutated_sample(draw: st.DrawFn, partner: LoadedPartner) -> dict[str, Any]:
    """One of the partner's sample payloads with some fields replaced by arbitrary JSON values
    (or text a partner might send), some removed, some added, perhaps with a key field."""
    base = dict(draw(st.sampled_from(sample_payloads(partner))))
    names = sorted(base)
    for name in draw(st.lists(st.sampled_from(names), max_size=len(names), unique=True)):
        base[name] = draw(st.one_of(json_values, plausible, deep_values))
    for name in draw(st.lists(st.sampled_from(names), max_size=3, unique=True)):
        base.pop(name, None)
    base.update(draw(st.dictionaries(any_text, json_values, max_size=3)))
    if draw(st.booleans()):
        base[reader.KEY_FIELD] = draw(st.one_of(any_text, json_values))
    return base


@st.composite
def arbitrary_payload(draw: st.DrawFn, partner: LoadedPartner) -> dict[str, Any]:
    """An arbitrary dict, its names often the partner's own so that the mapping reads them."""
    names = st.one_of(st.sampled_from(known_fields(partner)), any_text)
    values = st.one_of(json_values, plausible, deep_values)
    return draw(st.dictionaries(names, values, max_size=15))


def map_checked(partner: LoadedPartner, sent: dict[str, Any]) -> list[AttributionEvent] | None:
    """The payload as the gateway would hold it (sent as a JSON body, read, the key removed by
    merge), mapped; None when it was refused with a gateway error (the reader's 400, the
    mapping's 422); any other exception fails the test."""
    try:
        items = reader.parse_body(msgspec.json.encode(sent), "application/json", 1)
    except GatewayError as exc:
        assert exc.status_code == 400, exc  # nested too deeply
        return None
    [payload] = reader.merge({}, items)
    try:
        events = map_payload(partner.spec, payload, RECEIVED)
    except GatewayError as exc:
        assert exc.status_code == 422, exc
        assert exc.field, exc
        return None
    for event in events:
        check_event(partner, payload, event)
    # A retry of the same payload maps to the same dedupe keys: it is stored once.
    again = map_payload(partner.spec, payload, RECEIVED)
    assert [e.dedupe_key for e in again] == [e.dedupe_key for e in events]
    return events


def check_event(partner: LoadedPartner, payload: dict[str, Any], event: AttributionEvent) -> None:
    assert isinstance(event, AttributionEvent)
    assert event.partner == partner.spec.name
    assert re.fullmatch(r"[0-9a-f]{32}", event.event_id)
    assert event.kind in get_args(EventKind)
    assert isinstance(event.attributed, bool)
    assert event.event_name and event.event_name == event.event_name.strip()
    for name in TIME_FIELDS:  # every time out of a mapping is UTC
        moment = getattr(event, name)
        if moment is not None:
            assert moment.tzinfo is not None and moment.utcoffset().total_seconds() == 0, name
            assert datetime(1990, 1, 1, tzinfo=UTC) <= moment < datetime(2200, 1, 1, tzinfo=UTC)
    assert event.received_at == RECEIVED
    for name in ID_FIELDS:  # ids never all-zero, blank, a null word or a NUL
        value = getattr(event, name)
        if value is not None:
            assert isinstance(value, str) and value == value.strip() and value, name
            assert not ZERO_ID.match(value), (name, value)
            assert value.lower() not in NULL_WORDS, (name, value)
            assert "\x00" not in value, name
    for name in TEXT_FIELDS:
        value = getattr(event, name)
        if value is not None:
            assert isinstance(value, str) and value == value.strip() and value, name
            assert "\x00" not in value and len(value) <= 4096, name
    for name in ("platform",):
        value = getattr(event, name)
        assert value is None or value == value.lower()
    for name in ("currency", "country"):
        value = getattr(event, name)
        assert value is None or value == value.upper()
    if event.revenue is not None:
        assert isinstance(event.revenue, Decimal) and event.revenue.is_finite()
    assert event.dedupe_key and len(event.dedupe_key) <= MAX_DEDUPE_KEY
    assert event.raw == payload
    assert reader.KEY_FIELD not in event.raw  # the key is never stored
    # What storage writes and reads back.
    back = event_decoder.decode(event_encoder.encode(event))
    assert back.event_id == event.event_id and back.dedupe_key == event.dedupe_key
    for name in TIME_FIELDS:
        moment = getattr(back, name)
        assert moment is None or moment.utcoffset().total_seconds() == 0


@pytest.mark.parametrize("name", sorted(PARTNERS))
def test_samples_with_fields_replaced_map_or_are_refused(name: str) -> None:
    partner = PARTNERS[name]
    mapped = {"events": 0, "refused": 0}

    @given(payload=mutated_sample(partner))
    @examples(1)
    def run(payload: dict[str, Any]) -> None:
        events = map_checked(partner, payload)
        mapped["refused" if events is None else "events"] += 1

    run()
    # The samples themselves map: the strategy does reach the mapping's success path.
    for payload in sample_payloads(partner):
        assert map_checked(partner, payload)
    assert mapped["events"] > 0 and mapped["refused"] > 0, mapped  # both outcomes reached


@pytest.mark.parametrize("name", sorted(PARTNERS))
def test_arbitrary_payloads_map_or_are_refused(name: str) -> None:
    partner = PARTNERS[name]

    @given(payload=arbitrary_payload(partner))
    @examples(1)
    def run(payload: dict[str, Any]) -> None:
        map_checked(partner, payload)

    run()


@given(payload=json_objects)
@examples(1)
def test_every_partner_refuses_or_maps_the_same_arbitrary_dict(payload: dict[str, Any]) -> None:
    for partner in PARTNERS.values():
        map_checked(partner, payload)
