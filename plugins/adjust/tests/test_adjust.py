"""Adjust end to end: every sample through HTTP into storage, the mapping rules, and the
conformance kit over the partner."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import msgspec
import pytest
from litestar.testing import TestClient

from gateway import AttributionEvent
from gateway.app import create_app
from gateway.conformance import CHECKS
from gateway.errors import MappingError
from gateway.plugins import load_partners
from plugins.adjust.mapping import map_postback
from tests.fixtures import make_config, new_key

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
URL = "/partners/adjust/postback"


def query(name: str) -> str:
    return (SAMPLES / name).read_text(encoding="utf-8").strip()


def payload(name: str) -> dict[str, str]:
    """A sample as the gateway sees it: the query string decoded once."""
    return dict(parse_qsl(query(name), keep_blank_values=True))


def only(payload: dict[str, Any]) -> AttributionEvent:
    """What the mapping makes of one callback (before the core completes it)."""
    [event] = map_postback(payload)
    return event


class Adjust:
    """A gateway with Adjust enabled, its key, and helpers to send callbacks the way Adjust
    does (GET, placeholders in the query string) and read back what was stored."""

    def __init__(self, client: TestClient[Any], key: str, admin: dict[str, str]) -> None:
        self.client = client
        self.key = key
        self.admin = admin

    def get(self, query_string: str) -> Any:
        return self.client.get(f"{URL}?{query_string}&{urlencode({'api_key': self.key})}")

    def send(self, fields: dict[str, Any]) -> Any:
        return self.get(urlencode(fields))

    def post_json(self, body: dict[str, Any]) -> Any:
        return self.client.post(
            f"{URL}?{urlencode({'api_key': self.key})}",
            content=msgspec.json.encode(body),
            headers={"Content-Type": "application/json"},
        )

    def stored(self) -> list[dict[str, Any]]:
        r = self.client.get("/events?partner=adjust&limit=100", headers=self.admin)
        assert r.status_code == 200, r.text
        events: list[dict[str, Any]] = r.json()["events"]
        return events


@pytest.fixture
def adjust(tmp_path: Path, admin: dict[str, str]) -> Iterator[Adjust]:
    config = make_config(tmp_path, adjust=True)
    key = new_key(config, "adjust")
    with TestClient(create_app(config)) as client:
        yield Adjust(client, key, admin)


# -- the samples through HTTP -------------------------------------------------------------------

IDS = {
    "idfa": None,
    "idfv": None,
    "google_ad_id": "00000000-0000-4000-8000-0000000000a1",
    "android_id": None,
    "windows_ad_id": None,
    "partner_device_id": "0000000000000000000000000000fa01",
}

# file → the stored event's fields, from ../shared/samples/README.md and the samples themselves.
EXPECTED: dict[str, dict[str, Any]] = {
    "install_attributed.query": {
        "kind": "install",
        "event_name": "install",
        "source": "Fake Network",
        "campaign": "FAKE_spring",
        "adgroup": "FAKE_group_A",
        "ad": "FAKE_banner_red",
        "platform": "android",
        **IDS,
        "braze_id": "fake-braze-device-0001",
        "external_id": None,
        "event_time": "2030-01-02T03:05:06Z",
        "install_time": "2030-01-02T03:05:00Z",
        "touch_time": "2030-01-02T03:03:48Z",  # installed_at - conversion_duration (72 s)
        "revenue": None,
        "currency": None,
    },
    "event_purchase.query": {
        "kind": "event",
        "event_name": "purchase",
        "source": "Fake Network",
        "campaign": "FAKE_spring",
        "adgroup": "FAKE_group_A",
        "ad": "FAKE_banner_red",
        "platform": "android",
        **IDS,
        "braze_id": None,
        "external_id": "fake-user-0001",
        "event_time": "2030-01-05T08:11:12Z",
        "install_time": "2030-01-02T03:05:00Z",
        "touch_time": None,
        "revenue": 4.99,
        "currency": "USD",
    },
    "reattribution_retargeting.query": {
        "kind": "reengagement",
        "event_name": "reattribution",
        "source": "Fake Retargeting DSP",
        "campaign": "FAKE_winback",
        "adgroup": "FAKE_lapsed_group_A",
        "ad": "FAKE_banner_red",
        "platform": "android",
        **IDS,
        "braze_id": "fake-braze-device-0001",
        "external_id": "fake-user-0001",
        "event_time": "2030-01-09T03:05:00Z",
        "install_time": "2030-01-02T03:05:00Z",
        "touch_time": "2030-01-09T03:04:20Z",  # reattributed_at - conversion_duration (40 s)
        "revenue": None,
        "currency": None,
    },
}


def test_every_sample_has_an_expected_outcome() -> None:
    names = {p.name for p in SAMPLES.iterdir()}
    assert names == {*EXPECTED, "install_organic.query"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_attributed_sample_is_accepted_and_mapped(adjust: Adjust, name: str) -> None:
    r = adjust.get(query(name))
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "accepted"
    assert body["kind"] == EXPECTED[name]["kind"]
    [event] = adjust.stored()
    assert event["event_id"] == body["event_id"]
    assert event["partner"] == "adjust"
    assert event["attributed"] is True
    assert {field: event[field] for field in EXPECTED[name]} == EXPECTED[name]
    assert event["raw"] == payload(name)  # the key is not part of it
    assert datetime.fromisoformat(event["received_at"]).utcoffset() is not None


def test_organic_install_is_ignored_and_not_stored(adjust: Adjust) -> None:
    r = adjust.get(query("install_organic.query"))
    assert r.status_code == 200
    assert r.json() == {"status": "ignored", "reason": "organic"}
    assert adjust.stored() == []


def test_purchase_revenue_is_exact() -> None:
    event = only(payload("event_purchase.query"))
    assert (event.revenue, event.currency) == (Decimal("4.99"), "USD")


# -- time formats -------------------------------------------------------------------------------
# Adjust sends every time as epoch seconds: text in the GET query string, and a number where a
# callback is replayed as a JSON body.


@pytest.mark.parametrize(
    ("field", "stored_as"),
    [
        ("created_at", "event_time"),
        ("installed_at", "install_time"),
        ("click_time", "touch_time"),
    ],
)
def test_epoch_seconds_in_the_query_string(adjust: Adjust, field: str, stored_as: str) -> None:
    fields = payload("install_attributed.query")
    fields[field] = "1893553506"
    r = adjust.send(fields)
    assert r.status_code == 202, r.text
    [event] = adjust.stored()
    assert event[stored_as] == "2030-01-02T03:05:06Z"
    assert datetime.fromisoformat(event[stored_as]) == datetime(2030, 1, 2, 3, 5, 6, tzinfo=UTC)


def test_reattributed_at_epoch_seconds(adjust: Adjust) -> None:
    fields = payload("reattribution_retargeting.query")
    del fields["created_at"]
    fields["reattributed_at"] = "1894158307"
    r = adjust.send(fields)
    assert r.status_code == 202, r.text
    [event] = adjust.stored()
    assert event["event_time"] == "2030-01-09T03:05:07Z"
    assert event["touch_time"] == "2030-01-09T03:04:27Z"


def test_epoch_seconds_as_json_numbers(adjust: Adjust) -> None:
    body: dict[str, Any] = payload("install_attributed.query")
    body.update(created_at=1893553506, installed_at=1893553500, conversion_duration=72)
    event = only(body)
    assert event.event_time == datetime(2030, 1, 2, 3, 5, 6, tzinfo=UTC)
    assert event.install_time == datetime(2030, 1, 2, 3, 5, tzinfo=UTC)
    assert event.touch_time == datetime(2030, 1, 2, 3, 3, 48, tzinfo=UTC)
    r = adjust.post_json(body)
    assert r.status_code == 202, r.text
    [stored] = adjust.stored()
    assert (stored["event_time"], stored["install_time"]) == (
        "2030-01-02T03:05:06Z",
        "2030-01-02T03:05:00Z",
    )


@pytest.mark.parametrize(
    ("activity_kind", "event_time"),
    [
        ("install", datetime(2030, 1, 2, 3, 5, tzinfo=UTC)),  # installed_at
        ("reinstall", None),
        ("reattribution", None),  # no reattributed_at in this callback
    ],
)
def test_event_time_without_created_at(activity_kind: str, event_time: datetime | None) -> None:
    fields = payload("install_attributed.query")
    del fields["created_at"]
    fields["activity_kind"] = activity_kind
    assert only(fields).event_time == event_time


def test_in_app_event_without_created_at_has_no_event_time() -> None:
    fields = payload("event_purchase.query")
    del fields["created_at"]
    event = only(fields)
    assert event.event_time is None  # installed_at is not the purchase's time
    assert event.install_time == datetime(2030, 1, 2, 3, 5, tzinfo=UTC)


# -- the organic rule and its flag forms --------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "attributed"),
    [
        ({"is_organic": "1"}, False),
        ({"is_organic": "0"}, True),
        ({"is_organic": 1}, False),  # a JSON body
        ({"is_organic": 0}, True),
        ({"is_organic": "true"}, False),
        ({"is_organic": "False"}, True),
        ({"is_organic": None}, True),  # not in the template: the network decides
        ({"is_organic": "{is_organic}"}, True),  # an unfilled placeholder is no value
        ({"network_name": "Organic", "tracker_name": "Organic", "is_organic": None}, False),
        ({"network_name": "ORGANIC", "is_organic": "0"}, False),
        ({"network_name": None, "tracker_name": None}, False),  # no attribution at all
        ({"network_name": None, "tracker_name": "Organic"}, False),
    ],
)
def test_organic_rule(changes: dict[str, Any], attributed: bool) -> None:
    fields: dict[str, Any] = payload("install_attributed.query")
    for key, value in changes.items():
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    assert only(fields).attributed is attributed


def test_organic_purchase_is_ignored(adjust: Adjust) -> None:
    fields = payload("event_purchase.query")
    fields["is_organic"] = "1"
    r = adjust.send(fields)
    assert (r.status_code, r.json()) == (200, {"status": "ignored", "reason": "organic"})
    assert adjust.stored() == []


def test_network_organic_without_flag_is_ignored_over_http(adjust: Adjust) -> None:
    fields = payload("install_organic.query")
    del fields["is_organic"]
    r = adjust.send(fields)
    assert (r.status_code, r.json()) == (200, {"status": "ignored", "reason": "organic"})


# -- retries ------------------------------------------------------------------------------------


def test_retry_of_the_same_callback_is_stored_once(adjust: Adjust) -> None:
    first = adjust.get(query("event_purchase.query"))
    again = adjust.get(query("event_purchase.query"))
    assert (first.status_code, first.json()["status"]) == (202, "accepted")
    assert (again.status_code, again.json()["status"]) == (200, "duplicate")
    assert again.json()["event_id"] == first.json()["event_id"]
    assert len(adjust.stored()) == 1


def test_retry_with_fields_in_another_order_is_a_duplicate(adjust: Adjust) -> None:
    first = adjust.get(query("install_attributed.query"))
    reordered = "&".join(reversed(query("install_attributed.query").split("&")))
    again = adjust.get(reordered)
    assert (again.status_code, again.json()["status"]) == (200, "duplicate")
    assert again.json()["event_id"] == first.json()["event_id"]


def test_retry_after_an_attribution_update_is_a_duplicate(adjust: Adjust) -> None:
    first = adjust.get(query("install_attributed.query"))
    fields = payload("install_attributed.query")
    fields.update(
        network_name="Other Fake Network",
        campaign_name="FAKE_other",
        tracker="fk0009",
        tracker_name="Other Fake Network::FAKE_other",
    )
    again = adjust.send(fields)
    assert (again.status_code, again.json()["status"]) == (200, "duplicate")
    assert again.json()["event_id"] == first.json()["event_id"]
    [event] = adjust.stored()
    assert event["source"] == "Fake Network"  # the first delivery is what is kept


def test_two_purchases_by_the_same_device_are_two_events(adjust: Adjust) -> None:
    first = adjust.get(query("event_purchase.query"))
    fields = payload("event_purchase.query")
    fields["created_at"] = "1893831999"  # a second purchase, later
    second = adjust.send(fields)
    assert (first.status_code, second.status_code) == (202, 202)
    assert first.json()["event_id"] != second.json()["event_id"]
    assert len(adjust.stored()) == 2


def test_two_purchases_in_the_same_second_differ_by_product() -> None:
    fields = payload("event_purchase.query")
    other = {**fields, "product_id": "fake-sku-02", "revenue": "9.99"}
    assert only(fields).dedupe_key != only(other).dedupe_key


def test_dedupe_key_is_a_hash_of_the_stable_fields() -> None:
    event = only(payload("install_attributed.query"))
    assert event.dedupe_key.startswith("sha256:")
    assert event.dedupe_key == only(payload("install_attributed.query")).dedupe_key


# -- unusable values: 422 naming Adjust's field -------------------------------------------------


@pytest.mark.parametrize(
    ("sample", "changes", "field"),
    [
        ("install_attributed.query", {"created_at": "yesterday"}, "created_at"),
        ("install_attributed.query", {"installed_at": "2030-13-45"}, "installed_at"),
        ("install_attributed.query", {"installed_at": "99999999999999999999"}, "installed_at"),
        ("install_attributed.query", {"click_time": "soon"}, "click_time"),
        ("install_attributed.query", {"is_organic": "maybe"}, "is_organic"),
        ("install_attributed.query", {"conversion_duration": "-5"}, "conversion_duration"),
        ("install_attributed.query", {"conversion_duration": "a minute"}, "conversion_duration"),
        ("install_attributed.query", {"activity_kind": None}, "activity_kind"),
        ("event_purchase.query", {"revenue": "4,99"}, "revenue"),
        ("event_purchase.query", {"revenue_float": "NaN"}, "revenue_float"),
        ("event_purchase.query", {"event_name": None, "event": None}, "event_name"),
    ],
)
def test_unusable_values_answer_422_naming_the_field(
    adjust: Adjust, sample: str, changes: dict[str, Any], field: str
) -> None:
    fields = payload(sample)
    for key, value in changes.items():
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    r = adjust.send(fields)
    assert r.status_code == 422, r.text
    assert r.json()["status"] == "error"
    assert r.json()["field"] == field
    assert adjust.stored() == []


# -- ids ----------------------------------------------------------------------------------------


def test_zeroed_and_empty_ids_are_null(adjust: Adjust) -> None:
    fields = payload("install_attributed.query")
    fields.update(
        gps_adid="00000000-0000-0000-0000-000000000000",
        idfa="",
        idfv="{idfv}",  # an unfilled placeholder
        android_id="0",
        adid=" ",
        braze_device_id="",
        external_id="null",
    )
    r = adjust.send(fields)
    assert r.status_code == 202, r.text
    [event] = adjust.stored()
    for field in ("google_ad_id", "idfa", "idfv", "android_id", "partner_device_id"):
        assert event[field] is None, field
    assert (event["braze_id"], event["external_id"]) == (None, None)


def test_ios_ids_are_kept() -> None:
    fields = payload("install_attributed.query")
    del fields["gps_adid"]
    fields.update(
        os_name="ios",
        idfa="11111111-2222-4AAA-8BBB-333333333333",
        idfv="44444444-5555-4CCC-8DDD-666666666666",
    )
    event = only(fields)
    assert (event.idfa, event.idfv, event.google_ad_id) == (
        "11111111-2222-4AAA-8BBB-333333333333",
        "44444444-5555-4CCC-8DDD-666666666666",
        None,
    )
    assert event.platform == "ios"


def test_braze_id_from_partner_parameters() -> None:
    fields = payload("event_purchase.query")
    del fields["external_id"]
    fields["partner_parameters"] = '{"braze_device_id": "fake-braze-pp", "external_id": "u-9"}'
    event = only(fields)
    assert (event.braze_id, event.external_id) == ("fake-braze-pp", "u-9")


def test_top_level_braze_device_id_wins_over_partner_parameters() -> None:
    fields = payload("install_attributed.query")
    fields["partner_parameters"] = '{"braze_device_id": "fake-braze-pp"}'
    assert only(fields).braze_id == "fake-braze-device-0001"


def test_partner_parameters_that_are_not_json_are_left_alone() -> None:
    fields = payload("event_purchase.query")
    fields["partner_parameters"] = "braze_device_id=fake"
    event = only(fields)
    assert event.braze_id is None
    assert event.external_id == "fake-user-0001"


# -- kinds and names ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("activity_kind", "kind", "event_name"),
    [
        ("install", "install", "install"),
        ("reinstall", "reinstall", "reinstall"),
        ("reattribution_reinstall", "reinstall", "reinstall"),
        ("reattribution reinstall", "reinstall", "reinstall"),
        ("reattribution", "reengagement", "reattribution"),
        ("Install", "install", "install"),
    ],
)
def test_activity_kinds(activity_kind: str, kind: str, event_name: str) -> None:
    fields = payload("install_attributed.query")
    fields["activity_kind"] = activity_kind
    event = only(fields)
    assert (event.kind, event.event_name) == (kind, event_name)


@pytest.mark.parametrize(
    "activity_kind", ["session", "click", "impression", "rejected_install", "uninstall"]
)
def test_activities_without_attribution_are_ignored(adjust: Adjust, activity_kind: str) -> None:
    fields = payload("install_attributed.query")
    fields["activity_kind"] = activity_kind
    r = adjust.send(fields)
    assert (r.status_code, r.json()) == (200, {"status": "ignored", "reason": "no_events"})
    assert adjust.stored() == []


def test_event_token_names_the_event_without_event_name() -> None:
    fields = payload("event_purchase.query")
    del fields["event_name"]
    assert only(fields).event_name == "fk9ev1"


def test_event_without_activity_kind_is_an_in_app_event() -> None:
    fields = payload("event_purchase.query")
    del fields["activity_kind"]
    event = only(fields)
    assert (event.kind, event.event_name) == ("event", "purchase")


def test_revenue_float_wins_over_revenue() -> None:
    fields = payload("event_purchase.query")
    fields.update(revenue="499", revenue_float="4.99", currency="usd")
    event = only(fields)
    assert (event.revenue, event.currency) == (Decimal("4.99"), "usd")


def test_tracker_name_fills_missing_names() -> None:
    fields = payload("install_attributed.query")
    for name in ("network_name", "campaign_name", "adgroup_name", "creative_name"):
        del fields[name]
    event = only(fields)
    assert (event.source, event.campaign, event.adgroup, event.ad) == (
        "Fake Network",
        "FAKE_spring",
        "FAKE_group_A",
        "FAKE_banner_red",
    )
    assert event.attributed is True


def test_unicode_names_round_trip(adjust: Adjust) -> None:
    fields = payload("install_attributed.query")
    fields.update(network_name="Réseau Démo", campaign_name="夏のセール 🎉")
    r = adjust.send(fields)
    assert r.status_code == 202, r.text
    [event] = adjust.stored()
    assert (event["source"], event["campaign"]) == ("Réseau Démo", "夏のセール 🎉")


def test_callback_without_activity_kind_or_event_is_refused() -> None:
    with pytest.raises(MappingError) as err:
        map_postback({"network_name": "Fake Network", "created_at": "1893553506"})
    assert err.value.field == "activity_kind"


# -- the conformance kit ------------------------------------------------------------------------


@pytest.mark.parametrize("promise", sorted(CHECKS))
def test_conformance(promise: str) -> None:
    [partner] = load_partners(builtins=("plugins.adjust",), allow=()).values()
    CHECKS[promise](partner)
