"""The conformance kit over every partner in the tree, and over partners broken on purpose."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest

from gateway import AttributionEvent, PartnerSpec
from gateway.conformance import CHECKS, BrokenPromise, check_partner, samples
from gateway.plugins import LoadedPartner, builtin_plugins, load_partners
from plugins._template import mapping as template_mapping
from tests.fixtures import ROOT

TREE = load_partners(builtins=(*builtin_plugins(), "plugins._template"), allow=())
TEMPLATE_SAMPLES = str(ROOT / "plugins" / "_template" / "samples")


def test_the_tree_has_the_template_and_every_builtin() -> None:
    assert "example" in TREE and "kochava" in TREE
    assert set(builtin_plugins()) >= {"plugins.kochava"}


@pytest.mark.parametrize("promise", sorted(CHECKS))
@pytest.mark.parametrize("partner", sorted(TREE))
def test_partner_keeps_promise(partner: str, promise: str) -> None:
    CHECKS[promise](TREE[partner])


def broken(
    change: Callable[[AttributionEvent, Mapping[str, Any]], AttributionEvent] | None = None,
    **spec: Any,
) -> LoadedPartner:
    """The template partner with one thing broken."""

    def map_postback(payload: Mapping[str, Any]) -> AttributionEvent:
        event = template_mapping.map_postback(payload)
        return change(event, payload) if change else event

    fields = {"name": "broken", "map": map_postback, "samples": TEMPLATE_SAMPLES, **spec}
    return LoadedPartner(spec=PartnerSpec(**fields), source="test", version="0")


def _raise_everything(payload: Mapping[str, Any]) -> AttributionEvent:
    raise template_mapping.MappingError("event", "refused")


def _crash_on_garbage(payload: Mapping[str, Any]) -> AttributionEvent:
    str(payload.get("event", "")).lower()
    if not isinstance(payload.get("network", ""), str):
        raise TypeError("network is not a string")  # the kind of bug the kit is for
    return template_mapping.map_postback(payload)


def _replace(**changes: Any) -> Callable[[AttributionEvent, Mapping[str, Any]], AttributionEvent]:
    return lambda event, _: msgspec.structs.replace(event, **changes)


BROKEN: dict[str, LoadedPartner] = {
    "maps_its_samples": broken(map=_raise_everything),
    "organic_samples_are_organic": broken(_replace(attributed=True)),
    "only_input_errors": broken(map=_crash_on_garbage),
    "stable_dedupe_key": broken(
        lambda e, _: msgspec.structs.replace(e, dedupe_key=uuid.uuid4().hex)
    ),
    "distinct_dedupe_keys": broken(_replace(dedupe_key="always-the-same")),
    "utc_times": broken(_replace(event_time=datetime(2030, 1, 2, 3, 4, 5))),
    "normalised_ids": broken(_replace(idfa=" 00000000-0000-0000-0000-000000000000 ")),
    "http_round_trip": broken(_replace(source="Facebook Ads")),  # restricted: never stored
}


@pytest.mark.parametrize("promise", sorted(BROKEN))
def test_a_broken_partner_fails_naming_the_promise(promise: str) -> None:
    with pytest.raises(BrokenPromise) as err:
        CHECKS[promise](BROKEN[promise])
    assert err.value.promise == promise
    assert f"partner 'broken' breaks the promise {promise!r}" in str(err.value)


def test_every_promise_has_a_broken_partner() -> None:
    assert set(BROKEN) == set(CHECKS)


def test_a_broken_partner_keeps_the_other_promises() -> None:
    [failure] = check_partner(BROKEN["utc_times"])
    assert failure.promise == "utc_times"


def test_times_in_another_zone_are_not_utc() -> None:
    plus_two = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    with pytest.raises(BrokenPromise, match="event_time"):
        CHECKS["utc_times"](broken(_replace(event_time=plus_two)))


def test_a_partner_without_samples_fails() -> None:
    with pytest.raises(BrokenPromise) as err:
        samples(broken(samples=""))
    assert err.value.promise == "has_samples"


def test_samples_sent_by_a_method_the_partner_refuses_fail() -> None:
    with pytest.raises(BrokenPromise, match="does not accept"):
        CHECKS["http_round_trip"](broken(methods=("POST",)))
