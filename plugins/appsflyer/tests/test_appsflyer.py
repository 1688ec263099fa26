"""AppsFlyer end to end: every sample through HTTP into storage, and the mapping rules."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from litestar.testing import TestClient

from gateway import MappingError
from gateway.app import create_app
from gateway.conformance import CHECKS
from gateway.plugins import load_partners
from plugins.appsflyer.mapping import map_postback
from tests.fixtures import make_config, new_key

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
URL = "/partners/appsflyer/postback"
ADMIN = {"Authorization": "Bearer test-admin-token"}


def sample(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SAMPLES / name).read_text(encoding="utf-8"))
    return data


def as_query(payload: dict[str, Any]) -> str:
    """A payload as AppsFlyer's GET form sends it: every value as text, null as empty."""

    def value(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, bool):
            return "true" if v else "false"
        return str(v)

    return urlencode({k: value(v) for k, v in payload.items()})


def utc(value: str) -> datetime:
    """A stored time: must be UTC (offset zero)."""
    moment = datetime.fromisoformat(value)
    assert moment.utcoffset() == timedelta(0), value
    return moment


class Gateway:
    """A real gateway with AppsFlyer enabled, real SQLite storage and an AppsFlyer key."""

    def __init__(self, client: TestClient[Any], key: str) -> None:
        self.client = client
        self.key = key

    def post(self, body: bytes | dict[str, Any]) -> Any:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.client.post(
            f"{URL}?api_key={self.key}",
            content=content,
            headers={"Content-Type": "application/json"},
        )

    def get(self, query: str) -> Any:
        return self.client.get(f"{URL}?{query}&api_key={self.key}")

    def events(self) -> list[dict[str, Any]]:
        r = self.client.get("/events?partner=appsflyer&limit=100", headers=ADMIN)
        assert r.status_code == 200, r.text
        events: list[dict[str, Any]] = r.json()["events"]
        return events

    def status(self) -> dict[str, Any]:
        r = self.client.get("/partners/appsflyer/status", headers=ADMIN)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Gateway]:
    config = make_config(tmp_path / "data", appsflyer=True)
    key = new_key(config, "appsflyer")
    with TestClient(create_app(config)) as client:
        yield Gateway(client, key)


# -- every sample through HTTP -------------------------------------------------------------------

# What each sample must become, read back from GET /events.
ATTRIBUTED_INSTALL = {
    "partner": "appsflyer",
    "kind": "install",
    "event_name": "install",
    "attributed": True,
    "source": "fakenetwork_int",
    "source_id": None,
    "campaign": "FAKE_spring_campaign",
    "campaign_id": "fake-cmp-0001",
    "adgroup": "FAKE_adset_A",
    "adgroup_id": "fake-adset-0001",
    "ad": "FAKE_banner_red",
    "ad_id": "fake-ad-0001",
    "platform": "android",
    "app_id": "com.example.fakeapp",
    "idfa": None,
    "idfv": None,
    "google_ad_id": "00000000-0000-4000-8000-0000000000a1",
    "android_id": "fakeandroidid0001",
    "windows_ad_id": None,
    "partner_device_id": "0000000000000-0000001",
    "external_id": "fake-user-0001",
    "braze_id": "fake-braze-device-0001",
    "revenue": None,
    "currency": None,
    "country": "ZZ",
}
PURCHASE = {
    **ATTRIBUTED_INSTALL,
    "kind": "event",
    "event_name": "af_purchase",
    "campaign_id": None,
    "adgroup_id": None,
    "ad_id": None,
    "app_id": None,  # the sample sends neither bundle_id nor app_id
    "android_id": None,
    "braze_id": None,  # nor custom_data
    "revenue": 4.99,
    "currency": "USD",
    "country": None,
}
RESTRICTED_INSTALL = {
    "partner": "appsflyer",
    "kind": "install",
    "event_name": "install",
    "attributed": True,
    "source": None,
    "campaign": None,
    "adgroup": None,
    "ad": None,
    "platform": "ios",
    "app_id": "com.example.fakeapp",
    "idfa": None,  # all zeros: tracking not allowed
    "idfv": "00000000-0000-4000-8000-0000000000c3",
    "partner_device_id": "0000000000000-0000003",
    "external_id": "fake-user-0003",
    "braze_id": "fake-braze-device-0003",
}
REENGAGEMENT_EVENT = {
    "partner": "appsflyer",
    "kind": "reengagement",
    "event_name": "af_add_to_cart",
    "attributed": True,
    "source": "fakeretarget_int",
    "campaign": "FAKE_spring_winback",
    "campaign_id": "fake-cmp-0002",
    "adgroup": "FAKE_adset_B",
    "ad": "FAKE_banner_red",
    "platform": "ios",
    "idfa": "00000000-0000-4000-8000-0000000000d4",
    "idfv": "00000000-0000-4000-8000-0000000000e4",
    "braze_id": "fake-braze-device-0004",
    "external_id": "fake-user-0004",
    "revenue": None,
}

EXPECTED: dict[str, dict[str, Any]] = {
    "install_attributed.json": ATTRIBUTED_INSTALL,
    "event_purchase.json": PURCHASE,
    "install_restricted.json": RESTRICTED_INSTALL,
    "event_reengagement.query": REENGAGEMENT_EVENT,
}
TIMES: dict[str, dict[str, datetime | None]] = {
    "install_attributed.json": {
        "install_time": datetime(2030, 1, 2, 3, 5, 6, 789000, tzinfo=UTC),
        "event_time": datetime(2030, 1, 2, 3, 5, 6, 789000, tzinfo=UTC),
        "touch_time": datetime(2030, 1, 2, 3, 4, tzinfo=UTC),
    },
    "event_purchase.json": {
        "install_time": datetime(2030, 1, 2, 3, 5, 6, 789000, tzinfo=UTC),
        "event_time": datetime(2030, 1, 5, 10, 11, 12, 131000, tzinfo=UTC),
        "touch_time": None,
    },
    "install_restricted.json": {
        "install_time": datetime(2030, 1, 3, 9, 10, 11, 12000, tzinfo=UTC),
        "event_time": datetime(2030, 1, 3, 9, 10, 11, 12000, tzinfo=UTC),
        "touch_time": None,
    },
    "event_reengagement.query": {
        "install_time": datetime(2030, 1, 6, 8, 0, 1, tzinfo=UTC),
        "event_time": datetime(2030, 1, 6, 8, 2, 3, 456000, tzinfo=UTC),
        "touch_time": datetime(2030, 1, 6, 7, 59, 30, 500000, tzinfo=UTC),
    },
}
SHARED = {"install_attributed.json", "event_purchase.json", "install_organic.json"}


def send(gw: Gateway, name: str) -> Any:
    raw = (SAMPLES / name).read_bytes()
    if name.endswith(".query"):
        return gw.get(raw.decode().strip())
    return gw.post(raw)


def test_every_sample_has_an_expected_outcome() -> None:
    names = {p.name for p in SAMPLES.iterdir()}
    assert names == {*EXPECTED, "install_organic.json"}
    assert SHARED <= names  # the shared samples, kept under their own names


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_is_accepted_and_mapped(gw: Gateway, name: str) -> None:
    r = send(gw, name)
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "accepted"
    [event] = gw.events()
    assert event["event_id"] == r.json()["event_id"]
    assert {k: event[k] for k in EXPECTED[name]} == EXPECTED[name]
    for field, want in TIMES[name].items():
        assert (utc(event[field]) if event[field] else None) == want, field
    assert utc(event["received_at"]) <= datetime.now(UTC)
    assert event["dedupe_key"].startswith("sha256:")


def test_attributed_install_raw_payload_is_kept(gw: Gateway) -> None:
    assert gw.post((SAMPLES / "install_attributed.json").read_bytes()).status_code == 202
    [event] = gw.events()
    assert event["raw"] == sample("install_attributed.json")


def test_purchase_has_revenue_and_does_not_connect(gw: Gateway) -> None:
    r = gw.post((SAMPLES / "event_purchase.json").read_bytes())
    assert (r.status_code, r.json()["kind"]) == (202, "event")
    [event] = gw.events()
    assert Decimal(str(event["revenue"])) == Decimal("4.99")
    assert event["currency"] == "USD"
    status = gw.status()
    assert status["last_success_at"] is None and status["connected"] is False


def test_attributed_install_connects(gw: Gateway) -> None:
    assert gw.post((SAMPLES / "install_attributed.json").read_bytes()).status_code == 202
    status = gw.status()
    assert status["connected"] is True
    assert utc(status["last_success_at"]) <= datetime.now(UTC)


def test_organic_install_is_ignored_and_not_stored(gw: Gateway) -> None:
    r = gw.post((SAMPLES / "install_organic.json").read_bytes())
    assert r.status_code == 200
    assert r.json() == {"status": "ignored", "reason": "organic"}
    assert gw.events() == []
    status = gw.status()
    assert status["last_success_at"] is None
    assert status["counters"]["ignored_organic"] == 1


def test_install_sent_by_get_maps_as_by_post(gw: Gateway) -> None:
    r = gw.get(as_query(sample("install_attributed.json")))
    assert r.status_code == 202, r.text
    [event] = gw.events()
    assert {k: event[k] for k in ATTRIBUTED_INSTALL} == ATTRIBUTED_INSTALL
    assert utc(event["install_time"]) == datetime(2030, 1, 2, 3, 5, 6, 789000, tzinfo=UTC)


# -- retries -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_retry_is_stored_once(gw: Gateway, name: str) -> None:
    first = send(gw, name)
    again = send(gw, name)
    assert first.status_code == 202, first.text
    assert again.status_code == 200, again.text
    assert again.json() == {"status": "duplicate", "event_id": first.json()["event_id"]}
    assert len(gw.events()) == 1


def test_retry_without_its_empty_fields_is_a_duplicate(gw: Gateway) -> None:
    payload = sample("install_attributed.json")
    first = gw.post(payload)
    trimmed = {k: v for k, v in payload.items() if v not in (None, "")}
    assert len(trimmed) < len(payload)
    again = gw.post(trimmed)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json() == {"status": "duplicate", "event_id": first.json()["event_id"]}


def test_retry_after_a_time_zone_change_is_a_duplicate(gw: Gateway) -> None:
    payload = sample("install_attributed.json")
    first = gw.post(payload)
    payload.update(
        selected_timezone="Asia/Tokyo",
        install_time_selected_timezone="2030-01-02 12:05:06.789+0900",
    )
    again = gw.post(payload)
    assert again.json() == {"status": "duplicate", "event_id": first.json()["event_id"]}


def test_a_second_purchase_is_not_a_duplicate(gw: Gateway) -> None:
    payload = sample("event_purchase.json")
    first = gw.post(payload)
    payload["event_time"] = "2030-01-05 10:11:12.999"
    second = gw.post(payload)
    assert (first.status_code, second.status_code) == (202, 202), second.text
    assert len(gw.events()) == 2


def test_dedupe_key_is_stable_and_ignores_key_order() -> None:
    payload = sample("event_purchase.json")
    reordered = dict(reversed(list(payload.items())))
    assert map_postback(payload).dedupe_key == map_postback(reordered).dedupe_key


# -- times ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "want"),
    [
        # UTC, as Push API sends every time field: yyyy-mm-dd hh:mm:ss.sss, no zone.
        ("install_time", "2030-01-02 03:05:06.789", datetime(2030, 1, 2, 3, 5, 6, 789000, UTC)),
        # UTC without milliseconds, the raw-data reports' date-time format.
        ("install_time", "2030-01-02 03:05:06", datetime(2030, 1, 2, 3, 5, 6, tzinfo=UTC)),
        # The app's time zone, with an offset without a colon (…_selected_timezone fields).
        (
            "install_time_selected_timezone",
            "2030-01-02 12:05:06.789+0900",
            datetime(2030, 1, 2, 3, 5, 6, 789000, UTC),
        ),
        (
            "install_time_selected_timezone",
            "2030-01-01 19:05:06.789-0800",
            datetime(2030, 1, 2, 3, 5, 6, 789000, UTC),
        ),
        (
            "install_time_selected_timezone",
            "2030-01-02 03:05:06.789+0000",
            datetime(2030, 1, 2, 3, 5, 6, 789000, UTC),
        ),
    ],
)
def test_time_format(gw: Gateway, field: str, value: str, want: datetime) -> None:
    payload = sample("install_attributed.json")
    for name in ("install_time", "install_time_selected_timezone", "event_time"):
        payload.pop(name)
    payload[field] = value
    assert map_postback(payload).install_time == want
    r = gw.get(as_query(payload))  # and through HTTP, as GET sends it
    assert r.status_code == 202, r.text
    [event] = gw.events()
    assert utc(event["install_time"]) == want
    assert utc(event["event_time"]) == want  # an install's event time is its install time


def test_utc_field_wins_over_its_time_zone_twin() -> None:
    payload = sample("install_attributed.json")
    payload["install_time_selected_timezone"] = "2030-01-02 12:05:06.789+0900"
    payload["install_time"] = "2030-01-02 03:05:06.000"
    assert map_postback(payload).install_time == datetime(2030, 1, 2, 3, 5, 6, tzinfo=UTC)


def test_touch_and_event_times_fall_back_to_their_time_zone_twins() -> None:
    payload = sample("event_purchase.json")
    del payload["event_time"]
    payload["event_time_selected_timezone"] = "2030-01-05 19:11:12.131+0900"
    payload["attributed_touch_time_selected_timezone"] = "2030-01-01 19:00:00.000-0800"
    event = map_postback(payload)
    assert event.event_time == datetime(2030, 1, 5, 10, 11, 12, 131000, tzinfo=UTC)
    assert event.touch_time == datetime(2030, 1, 2, 3, 0, tzinfo=UTC)


def test_in_app_event_without_event_time_has_none() -> None:
    payload = sample("event_purchase.json")
    del payload["event_time"]
    assert map_postback(payload).event_time is None  # not the install time


# -- flags, kinds, organic rule ------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, "true", "TRUE", "True", 1, "1"])
def test_is_retargeting_true_in_every_form(value: Any) -> None:
    payload = {**sample("event_purchase.json"), "campaign_type": "", "is_retargeting": value}
    event = map_postback(payload)
    assert (event.kind, event.event_name) == ("reengagement", "af_purchase")


@pytest.mark.parametrize("value", [False, "false", "FALSE", "False", 0, "0", "", None])
def test_is_retargeting_false_in_every_form(value: Any) -> None:
    payload = {**sample("event_purchase.json"), "is_retargeting": value}
    assert map_postback(payload).kind == "event"


def test_retargeting_campaign_type_makes_a_reengagement_event() -> None:
    payload = {**sample("event_purchase.json"), "campaign_type": "Retargeting"}
    assert map_postback(payload).kind == "reengagement"


@pytest.mark.parametrize(
    ("event_name", "kind"),
    [
        ("install", "install"),
        ("reinstall", "reinstall"),
        ("re-attribution", "reinstall"),
        ("re-engagement", "reengagement"),
        ("Re-Engagement", "reengagement"),
    ],
)
def test_conversion_kinds(event_name: str, kind: str) -> None:
    payload = {**sample("install_attributed.json"), "event_name": event_name}
    if kind != "install":
        payload.update(is_retargeting=True, campaign_type="retargeting")
    event = map_postback(payload)
    assert (event.kind, event.event_name) == (kind, kind)


@pytest.mark.parametrize(
    "changes",
    [
        {"media_source": "organic"},
        {"media_source": "Organic", "campaign_type": "ua"},
        {"media_source": "ORGANIC"},
        {"campaign_type": "organic"},
        {"campaign_type": "Organic", "media_source": "fakenetwork_int"},
        {"media_source": None, "campaign_type": None},
        {"media_source": "", "campaign_type": " "},
    ],
)
def test_organic_rule(changes: dict[str, Any]) -> None:
    payload = {**sample("install_attributed.json"), **changes}
    assert map_postback(payload).attributed is False


def test_organic_in_app_event_is_ignored(gw: Gateway) -> None:
    payload = {
        **sample("event_purchase.json"),
        "media_source": "Organic",
        "campaign_type": "organic",
    }
    r = gw.post(payload)
    assert r.json() == {"status": "ignored", "reason": "organic"}
    assert gw.events() == []


def test_attributed_without_media_source_when_campaign_type_is_paid() -> None:
    payload = {**sample("install_attributed.json"), "media_source": None}
    event = map_postback(payload)
    assert (event.attributed, event.source) == (True, None)


@pytest.mark.parametrize("value", ["restricted", "Restricted", "RESTRICTED"])
def test_restricted_media_source_is_kept_with_source_null(value: str) -> None:
    payload = {**sample("install_attributed.json"), "media_source": value}
    event = map_postback(payload)
    assert (event.attributed, event.source) == (True, None)


def test_restricted_network_names_are_still_filtered_by_the_core(gw: Gateway) -> None:
    payload = {**sample("install_attributed.json"), "media_source": "Facebook Ads"}
    r = gw.post(payload)
    assert (r.status_code, r.json()) == (200, {"status": "ignored", "reason": "restricted_network"})
    assert gw.events() == []


# -- ids, Braze id, revenue ----------------------------------------------------------------------


def test_zeroed_and_empty_ids_become_null(gw: Gateway) -> None:
    payload = sample("install_attributed.json")
    payload.update(
        idfa="00000000-0000-0000-0000-000000000000",
        idfv="",
        advertising_id="00000000-0000-0000-0000-000000000000",
        android_id="   ",
        customer_user_id="",
        custom_data='{"brazeCustomerId":"00000000-0000-0000-0000-000000000000"}',
        af_c_id=None,
    )
    assert gw.post(payload).status_code == 202
    [event] = gw.events()
    for field in ("idfa", "idfv", "google_ad_id", "android_id", "external_id", "braze_id"):
        assert event[field] is None, field
    assert event["campaign_id"] is None
    assert event["partner_device_id"] == "0000000000000-0000001"


@pytest.mark.parametrize(
    ("custom_data", "want"),
    [
        ('{"brazeCustomerId":"b-android"}', "b-android"),
        ('{"brazeDeviceId":"b-ios"}', "b-ios"),
        ('{"brazeCustomerId":"b-android","brazeDeviceId":"b-ios"}', "b-ios"),
        ('{"brazeDeviceId":"","brazeCustomerId":"b-android"}', "b-android"),
        ({"brazeDeviceId": "b-object"}, "b-object"),
        ('{"BRAZE_DEVICE_ID":"b-loose"}', "b-loose"),
        ('{"other":"x"}', None),
        ("", None),
        (None, None),
    ],
)
def test_braze_id_from_custom_data(custom_data: Any, want: str | None) -> None:
    payload = {**sample("install_attributed.json"), "custom_data": custom_data}
    assert map_postback(payload).braze_id == want


def test_revenue_from_event_value_when_event_revenue_is_not_sent() -> None:
    payload = sample("event_purchase.json")
    del payload["event_revenue"], payload["event_revenue_currency"]
    event = map_postback(payload)
    assert (event.revenue, event.currency) == (Decimal("4.99"), "USD")
    payload["event_value"] = json.dumps({"af_revenue": 12.5, "af_currency": "eur"})
    event = map_postback(payload)
    assert (event.revenue, event.currency) == (Decimal("12.5"), "eur")  # the core upper-cases


def test_event_revenue_wins_over_event_value() -> None:
    payload = {**sample("event_purchase.json"), "event_value": '{"af_revenue":"1.00"}'}
    assert map_postback(payload).revenue == Decimal("4.99")


def test_event_value_is_not_read_when_revenue_fields_are_sent() -> None:
    payload = {**sample("event_purchase.json"), "event_value": "not json"}
    assert map_postback(payload).revenue == Decimal("4.99")


# -- unusable values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"event_name": None}, "event_name"),
        ({"install_time": "yesterday"}, "install_time"),
        ({"event_time": "2030-13-45 25:61:61.000"}, "event_time"),
        ({"attributed_touch_time": "soon"}, "attributed_touch_time"),
        (
            {"install_time": None, "install_time_selected_timezone": "2030-01-02 12:05:06.789"},
            "install_time_selected_timezone",
        ),
        ({"custom_data": "not json"}, "custom_data"),
        ({"custom_data": "[1, 2]"}, "custom_data"),
        ({"is_retargeting": "maybe"}, "is_retargeting"),
        ({"event_revenue": "four"}, "event_revenue"),
        ({"event_revenue": None, "event_value": "{not json"}, "event_value"),
        ({"event_revenue": None, "event_value": '{"af_revenue":"lots"}'}, "event_value.af_revenue"),
    ],
)
def test_unusable_value_is_refused_naming_the_field(
    gw: Gateway, changes: dict[str, Any], field: str
) -> None:
    payload = {**sample("event_purchase.json"), **changes}
    with pytest.raises(MappingError) as err:
        map_postback(payload)
    assert err.value.field == field
    r = gw.post(payload)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field
    assert r.json()["status"] == "error"
    assert gw.events() == []


# -- the conformance kit -------------------------------------------------------------------------


@pytest.mark.parametrize("promise", sorted(CHECKS))
def test_conformance(promise: str) -> None:
    [partner] = load_partners(builtins=("plugins.appsflyer",), allow=()).values()
    CHECKS[promise](partner)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"campaign": None, "af_c_id": ["x"]}, "af_c_id"),
        ({"campaign": {"a": 1}}, "campaign"),
        ({"af_adset": None, "af_adset_id": [1]}, "af_adset_id"),
        ({"af_ad": None, "af_ad_id": {"b": 2}}, "af_ad_id"),
        ({"bundle_id": None, "app_id": [1]}, "app_id"),
    ],
)
def test_the_field_used_is_the_field_named(changes: dict[str, Any], field: str) -> None:
    payload = {**sample("install_attributed.json"), **changes}
    with pytest.raises(MappingError) as err:
        map_postback(payload)
    assert err.value.field == field


def test_names_fall_back_to_ids() -> None:
    payload = sample("install_attributed.json")
    payload.update(campaign=None, af_adset="", af_ad=None, bundle_id=None)
    event = map_postback(payload)
    assert (event.campaign, event.adgroup, event.ad) == (
        "fake-cmp-0001",
        "fake-adset-0001",
        "fake-ad-0001",
    )
    assert event.app_id == "com.example.fakeapp"  # app_id, as Android sends the package name
