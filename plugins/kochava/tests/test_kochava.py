"""Kochava end to end: every sample through HTTP into storage, and the mapping rules."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

import pytest

from gateway.errors import MappingError
from plugins.kochava.mapping import map_postback
from tests.fixtures import kochava_samples

SAMPLES = kochava_samples()


def sample(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(SAMPLES[name])
    return data


# file → (status code, status, source, campaign, adgroup, ad), from the samples' README.
EXPECTED = {
    "install_ios_attributed.json": (
        202, "accepted", "FakeNetwork Ads", "spring_launch_us", "pub_123", "banner_320x50_v2",
    ),
    "install_android_identity_link.json": (
        202, "accepted", "Example Video Network", "retarget_q2", "app_8812", "video_15s_b",
    ),
    "event_reengagement_purchase.json": (
        202, "accepted", "Example Retargeting DSP", "winback_may", None, "carousel_3",
    ),
    "install_ios_zeroed_idfa.json": (
        202, "accepted", "FakeNetwork Ads", "spring_launch_us", "pub_123", "native_1",
    ),
    "install_unicode_names.json": (
        202, "accepted", "Réseau Démo", "夏のセール 🎉 – Ünïcödé", "사이트_01", "creatívé #1",
    ),
}  # fmt: skip


def test_every_sample_has_an_expected_outcome() -> None:
    assert set(SAMPLES) == {*EXPECTED, "install_organic.json"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_is_accepted_and_mapped(client, api_key, admin, name: str) -> None:
    code, status, source, campaign, adgroup, ad = EXPECTED[name]
    r = client.post(f"/partners/kochava/postback?api_key={api_key}", content=SAMPLES[name])
    assert (r.status_code, r.json()["status"]) == (code, status)
    [event] = client.get("/events?partner=kochava", headers=admin).json()["events"]
    assert event["event_id"] == r.json()["event_id"]
    assert (event["source"], event["campaign"], event["adgroup"], event["ad"]) == (
        source,
        campaign,
        adgroup,
        ad,
    )
    assert event["partner"] == "kochava"
    assert event["attributed"] is True
    assert event["raw"] == sample(name)


def test_organic_install_is_ignored_and_not_stored(client, api_key, admin) -> None:
    r = client.post(
        f"/partners/kochava/postback?api_key={api_key}", content=SAMPLES["install_organic.json"]
    )
    assert r.status_code == 200
    assert r.json() == {"status": "ignored", "reason": "organic"}
    assert client.get("/events", headers=admin).json()["events"] == []


def test_ios_install_keeps_idfa_and_idfv() -> None:
    event = map_postback(sample("install_ios_attributed.json"))
    assert event.kind == "install" and event.event_name == "install"
    assert event.idfa == "11111111-2222-4AAA-8BBB-333333333333"
    assert event.idfv == "44444444-5555-4CCC-8DDD-666666666666"
    assert event.partner_device_id == "KIFAKE00000000000000000000000000000000000001"
    assert event.platform == "ios" and event.app_id == "com.example.fakeapp"
    assert event.campaign_id == "kofakeapp-ios-cmp-0001" and event.source_id == "9999"
    assert event.touch_time is not None and event.touch_time.isoformat() == (
        "2024-05-01T12:00:03+00:00"
    )
    assert event.install_time is not None
    assert event.install_time.isoformat() == "2024-05-01T12:04:41+00:00"
    assert event.event_time == event.install_time
    assert event.dedupe_key == "fake-txn-0001"


def test_android_identity_link_gives_braze_id_and_adid() -> None:
    event = map_postback(sample("install_android_identity_link.json"))
    assert event.braze_id == "fake-braze-device-0000-0000-000000000002"
    assert event.google_ad_id == "77777777-8888-4EEE-8FFF-999999999999"
    assert event.android_id == "fakeandroid00002"
    assert event.country == "DE"


def test_reengagement_purchase_has_revenue_and_kind() -> None:
    event = map_postback(sample("event_reengagement_purchase.json"))
    assert event.kind == "reengagement"
    assert event.event_name == "purchase"
    assert event.revenue == Decimal("4.99") and event.currency == "USD"
    assert event.adgroup is None
    assert event.event_time is not None
    assert event.event_time.isoformat() == "2024-05-20T21:00:00+00:00"


def test_zeroed_idfa_becomes_null() -> None:
    event = map_postback(sample("install_ios_zeroed_idfa.json"))
    assert event.idfa is None
    assert event.idfv == "5A5A5A5A-6B6B-4C7C-8D8D-9E9E9E9E9E95"


@pytest.mark.parametrize(
    "changes",
    [
        {"network_name": None},
        {"network_name": ""},
        {"network_name": "Unattributed"},
        {"network_name": "ORGANIC"},
        {"network_name": "none"},
        {"attribution": False},
        {"attribution": "false"},
        {"attribution": 0},
    ],
)
def test_organic_rule(changes: dict[str, Any]) -> None:
    payload = {**sample("install_ios_attributed.json"), **changes}
    assert map_postback(payload).attributed is False


def test_attributed_when_attribution_flag_true() -> None:
    payload = {**sample("install_ios_attributed.json"), "attribution": "TRUE"}
    assert map_postback(payload).attributed is True


def test_adgroup_name_wins_over_site_id_and_campaign_falls_back_to_id() -> None:
    payload = sample("install_ios_attributed.json")
    payload.update(adgroup_name="Group A", campaign_name="")
    event = map_postback(payload)
    assert event.adgroup == "Group A"
    assert event.campaign == "kofakeapp-ios-cmp-0001"


@pytest.mark.parametrize(
    "identity_link",
    [
        {"brazeId": "b-1"},
        {"Braze_User_ID": "b-1"},
        {"braze": "b-1"},
        {"appboy_id": "b-1"},
        json.dumps({"braze_id": "b-1"}),
    ],
)
def test_braze_id_aliases(identity_link: Any) -> None:
    payload = {**sample("install_android_identity_link.json"), "identity_link": identity_link}
    assert map_postback(payload).braze_id == "b-1"


def test_identity_link_that_is_not_an_object_is_refused() -> None:
    payload = {**sample("install_android_identity_link.json"), "identity_link": "not json"}
    with pytest.raises(MappingError) as err:
        map_postback(payload)
    assert err.value.field == "identity_link"


def test_in_app_event_without_a_name_is_refused() -> None:
    with pytest.raises(MappingError) as err:
        map_postback({"network_name": "FakeNetwork Ads"})
    assert err.value.field == "event_name"


def test_reinstall_kind() -> None:
    payload = {**sample("install_ios_attributed.json"), "attribution_type": "reinstall"}
    event = map_postback(payload)
    assert (event.kind, event.event_name) == ("reinstall", "reinstall")


def test_get_postback_with_macros_in_the_query_string(client, api_key, admin) -> None:
    payload = sample("install_android_identity_link.json")
    payload["identity_link"] = json.dumps(payload["identity_link"])
    payload["is_first_install"] = "true"
    r = client.get(f"/partners/kochava/postback?{urlencode(payload)}&api_key={api_key}")
    assert r.status_code == 202, r.text
    [event] = client.get("/events", headers=admin).json()["events"]
    assert event["braze_id"] == "fake-braze-device-0000-0000-000000000002"
    assert event["adgroup"] == "app_8812"
    assert event["install_time"] == "2024-05-02T08:15:00Z"


def test_unusable_fallback_is_refused_naming_the_field_sent(client, api_key, admin) -> None:
    body = {"event_name": "_install", "network_name": "N", "site_id": ["a"]}
    r = client.post(f"/partners/kochava/postback?api_key={api_key}", json=body)
    assert r.status_code == 422, r.text
    assert (r.json()["status"], r.json()["field"]) == ("error", "site_id")
    assert client.get("/events", headers=admin).json()["events"] == []


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"campaign_name": None, "campaign_id": {"id": 1}}, "campaign_id"),
        ({"adgroup_name": "", "site_id": ["a"]}, "site_id"),
        ({"adgroup_name": "Group A", "adgroup_id": ["a"]}, "adgroup_id"),
        ({"install_time": None, "install_date": "yesterday"}, "install_date"),
        ({"click_time": None, "impression_time": "soon"}, "impression_time"),
        ({"network_name": "{network_name}", "network": ["N"]}, "network"),
        ({"identity_link": {"Braze-ID": ["b"]}}, "identity_link.Braze-ID"),
        ({"identity_link": {}, "braze_id": {"id": 1}}, "braze_id"),
        ({"identity_link": {"userId": ["u"]}}, "identity_link.userId"),
    ],
)
def test_unusable_value_is_refused_naming_the_field_sent(
    changes: dict[str, Any], field: str
) -> None:
    payload = {**sample("install_ios_attributed.json"), **changes}
    with pytest.raises(MappingError) as err:
        map_postback(payload)
    assert err.value.field == field
