"""Branch end to end: every sample through HTTP into storage, the mapping rules, and the
conformance kit over the partner."""

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

from gateway.app import create_app
from gateway.conformance import CHECKS
from gateway.errors import MappingError
from gateway.plugins import load_partners
from plugins.branch.mapping import map_postback
from tests.fixtures import ADMIN_TOKEN, make_config, new_key

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class Branch:
    """A gateway with Branch enabled, a Branch key, and the calls the tests make."""

    def __init__(self, client: TestClient[Any], key: str) -> None:
        self.client = client
        self.key = key

    def post(self, body: bytes | str | Any) -> Any:
        content = body if isinstance(body, bytes | str) else json.dumps(body)
        return self.client.post(f"/partners/branch/postback?api_key={self.key}", content=content)

    def get(self, query: str) -> Any:
        return self.client.get(f"/partners/branch/postback?{query}&api_key={self.key}")

    def events(self) -> list[dict[str, Any]]:
        r = self.client.get("/events?partner=branch&limit=100", headers=ADMIN)
        assert r.status_code == 200, r.text
        events: list[dict[str, Any]] = r.json()["events"]
        return events

    def status(self) -> dict[str, Any]:
        r = self.client.get("/partners/branch/status", headers=ADMIN)
        assert r.status_code == 200, r.text
        status: dict[str, Any] = r.json()
        return status


@pytest.fixture
def branch(tmp_path: Path) -> Iterator[Branch]:
    config = make_config(tmp_path, branch=True)
    key = new_key(config, "branch")
    with TestClient(create_app(config)) as client:
        yield Branch(client, key)


def raw(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def sample(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(raw(name))
    return data


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


def stored_time(value: str | None) -> datetime | None:
    """A time read back from GET /events, which must be UTC."""
    if value is None:
        return None
    moment = datetime.fromisoformat(value)
    assert moment.utcoffset() == timedelta(0), value
    return moment


# -- every sample through HTTP ------------------------------------------------------------------

# The expected outcome of each sample in /work/shared/samples/branch (see its README) and of the
# extra shapes added here: the status and the mapped fields read back from GET /events.
INSTALL_ATTRIBUTED: dict[str, Any] = {
    "kind": "install",
    "event_name": "install",
    "attributed": True,
    "source": "Fake Ad Network",
    "campaign": "FAKE_spring",
    "campaign_id": "fake-cmp-0001",
    "adgroup": "FAKE_group_A",
    "adgroup_id": "fake-adset-0001",
    "ad": "FAKE_banner_red",
    "ad_id": "fake-cr-0001",
    "platform": "android",
    "idfa": None,
    "idfv": None,
    "google_ad_id": "00000000-0000-4000-8000-0000000000a1",
    "android_id": "fakeandroidid0001",
    "braze_id": "fake-braze-device-0001",
    "external_id": "fake-user-0001",
    "revenue": None,
    "currency": None,
    "country": "ZZ",
    "dedupe_key": "100000000000000001",
}
EVENT_PURCHASE: dict[str, Any] = {
    "kind": "event",
    "event_name": "PURCHASE",
    "attributed": True,
    "source": "Fake Ad Network",
    "campaign": "FAKE_spring",
    "adgroup": "FAKE_group_A",
    "ad": "FAKE_banner_red",
    "platform": "android",
    "google_ad_id": "00000000-0000-4000-8000-0000000000a1",
    "braze_id": None,
    "external_id": "fake-user-0001",
    "revenue": 4.99,
    "currency": "USD",
    "dedupe_key": "100000000000000004",
}
OPEN_REENGAGEMENT: dict[str, Any] = {
    "kind": "reengagement",
    "event_name": "OPEN",
    "attributed": True,
    "source": "Fake Ad Network",
    "campaign": "FAKE_spring_winback",
    "campaign_id": "fake-cmp-0005",
    "adgroup": "FAKE_group_B",
    "ad": "FAKE_banner_red",
    "platform": "ios",
    "idfa": "00000000-0000-4000-8000-0000000000c5",
    "idfv": "00000000-0000-4000-8000-0000000000d5",
    "braze_id": "fake-braze-device-0005",
    "external_id": "fake-user-0005",
    "country": "US",
    "dedupe_key": "100000000000000005",
}
REINSTALL: dict[str, Any] = {
    "kind": "reinstall",
    "event_name": "reinstall",
    "attributed": True,
    "source": "Fake Video Network",
    "campaign": "FAKE_spring_reinstall",
    "adgroup": "FAKE_group_C",
    "ad": "FAKE_video_15s",
    "ad_id": "fake-ad-0006",
    "platform": "ios",
    "idfa": None,  # all zeros
    "idfv": "00000000-0000-4000-8000-0000000000b6",
    "braze_id": "fake-braze-device-0006",
    "external_id": "fake-user-0006",
    "country": "GB",
    "dedupe_key": "100000000000000006",
}
REGISTRATION: dict[str, Any] = {
    "kind": "event",
    "event_name": "COMPLETE_REGISTRATION",
    "attributed": True,
    "source": "Fake Video Network",
    "campaign": "FAKE_spring_reinstall",
    "adgroup": "FAKE_group_C",
    "ad": "FAKE_video_15s",
    "braze_id": "fake-braze-device-0006",
    "dedupe_key": "100000000000000007",
}


def assert_fields(event: dict[str, Any], expected: dict[str, Any]) -> None:
    assert {k: event[k] for k in expected} == expected
    assert event["partner"] == "branch"


def test_every_sample_has_an_expected_outcome() -> None:
    assert sorted(p.name for p in SAMPLES.iterdir()) == [
        "batch_reinstall_and_registration.json",
        "event_open_reengagement.query",
        "event_purchase.json",
        "install_attributed.json",
        "install_organic.json",
    ]


def test_attributed_install_is_accepted_and_mapped(branch: Branch) -> None:
    r = branch.post(raw("install_attributed.json"))
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "accepted" and r.json()["kind"] == "install"
    [event] = branch.events()
    assert event["event_id"] == r.json()["event_id"]
    assert_fields(event, INSTALL_ATTRIBUTED)
    assert stored_time(event["event_time"]) == utc(2030, 1, 2, 3, 5, 6, 789000)
    assert stored_time(event["install_time"]) == utc(2030, 1, 2, 3, 5, 6, 789000)
    assert stored_time(event["touch_time"]) == utc(2030, 1, 2, 3, 4)
    assert event["raw"] == sample("install_attributed.json")
    # An attributed install connects the partner.
    status = branch.status()
    assert status["connected"] is True and status["last_success_at"] is not None


def test_purchase_is_an_event_with_revenue(branch: Branch) -> None:
    r = branch.post(raw("event_purchase.json"))
    assert r.status_code == 202, r.text
    assert (r.json()["status"], r.json()["kind"]) == ("accepted", "event")
    [event] = branch.events()
    assert_fields(event, EVENT_PURCHASE)
    assert stored_time(event["event_time"]) == utc(2030, 1, 5, 8, 11, 12, 131000)
    assert stored_time(event["touch_time"]) == utc(2030, 1, 2, 3, 4)
    assert event["install_time"] is None
    # An in-app event does not connect the partner.
    assert branch.status()["last_success_at"] is None


def test_organic_install_is_ignored_and_not_stored(branch: Branch) -> None:
    r = branch.post(raw("install_organic.json"))
    assert r.status_code == 200
    assert r.json() == {"status": "ignored", "reason": "organic"}
    assert branch.events() == []
    assert branch.status()["last_success_at"] is None


def test_get_webhook_with_log_level_names(branch: Branch) -> None:
    r = branch.get(raw("event_open_reengagement.query").decode().strip())
    assert r.status_code == 202, r.text
    assert (r.json()["status"], r.json()["kind"]) == ("accepted", "reengagement")
    [event] = branch.events()
    assert_fields(event, OPEN_REENGAGEMENT)
    assert stored_time(event["event_time"]) == utc(2030, 1, 6, 3, 20)
    assert stored_time(event["touch_time"]) == utc(2030, 1, 6, 3, 19)


def test_batch_of_events_in_one_body(branch: Branch) -> None:
    r = branch.post(raw("batch_reinstall_and_registration.json"))
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["status"], body["accepted"], body["duplicate"], body["ignored"]) == (
        "accepted",
        2,
        0,
        0,
    )
    by_key = {e["dedupe_key"]: e for e in branch.events()}
    assert_fields(by_key["100000000000000006"], REINSTALL)
    assert_fields(by_key["100000000000000007"], REGISTRATION)
    reinstall = by_key["100000000000000006"]
    assert stored_time(reinstall["event_time"]) == utc(2030, 1, 7, 4, 20)
    assert stored_time(reinstall["install_time"]) == utc(2030, 1, 7, 4, 20)
    assert stored_time(reinstall["touch_time"]) == utc(2030, 1, 7, 1, 33, 20)
    assert stored_time(by_key["100000000000000007"]["event_time"]) == utc(2030, 1, 7, 4, 26)


# -- retries ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["install_attributed.json", "event_purchase.json", "event_open_reengagement.query"]
)
def test_retry_of_the_same_delivery_is_stored_once(branch: Branch, name: str) -> None:
    """Branch re-sends the same event (same ``id``) when it got no answer in time."""

    def send() -> Any:
        if name.endswith(".query"):
            return branch.get(raw(name).decode().strip())
        return branch.post(raw(name))

    first = send()
    assert first.status_code == 202, first.text
    again = send()
    assert again.status_code == 200, again.text
    assert again.json() == {"status": "duplicate", "event_id": first.json()["event_id"]}
    assert [e["event_id"] for e in branch.events()] == [first.json()["event_id"]]


def test_retry_inside_a_batch_is_a_duplicate_item(branch: Branch) -> None:
    """A retried event may come back inside a batch with new events: only the new are stored."""
    first = branch.post(raw("install_attributed.json"))
    assert first.status_code == 202
    batch = [sample("install_attributed.json"), sample("event_purchase.json")]
    r = branch.post(batch)
    assert r.status_code == 202, r.text
    results = r.json()["results"]
    assert results[0] == {"status": "duplicate", "event_id": first.json()["event_id"]}
    assert results[1]["status"] == "accepted"
    assert sorted(e["dedupe_key"] for e in branch.events()) == [
        "100000000000000001",
        "100000000000000004",
    ]


def test_same_id_with_a_numeric_id_is_the_same_event(branch: Branch) -> None:
    """Branch's ids are 64-bit numbers; sent as a JSON number or as text they are one event."""
    as_text = sample("install_attributed.json")
    as_number = {**as_text, "id": int(as_text["id"])}
    assert branch.post(as_text).status_code == 202
    again = branch.post(as_number)
    assert (again.status_code, again.json()["status"]) == (200, "duplicate")


def test_distinct_ids_are_distinct_events(branch: Branch) -> None:
    payload = sample("install_attributed.json")
    assert branch.post(payload).status_code == 202
    assert branch.post({**payload, "id": "100000000000000099"}).status_code == 202
    assert len(branch.events()) == 2


def test_without_an_id_a_retry_still_dedupes(branch: Branch) -> None:
    payload = {k: v for k, v in sample("install_attributed.json").items() if k != "id"}
    first = branch.post(payload)
    assert first.status_code == 202, first.text
    again = branch.post(payload)
    assert again.json() == {"status": "duplicate", "event_id": first.json()["event_id"]}


# -- times --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1893553506789, utc(2030, 1, 2, 3, 5, 6, 789000)),  # epoch ms, JSON number (POST)
        ("1893553506789", utc(2030, 1, 2, 3, 5, 6, 789000)),  # epoch ms, text (GET macro)
        (1893553506789.0, utc(2030, 1, 2, 3, 5, 6, 789000)),  # epoch ms written as a float
    ],
)
def test_time_formats(value: Any, expected: datetime) -> None:
    payload = {
        **sample("install_attributed.json"),
        "timestamp": value,
        "last_attributed_touch_timestamp": value,
    }
    event = map_postback(payload)
    assert event.event_time == expected and event.event_time.tzinfo is UTC
    assert event.install_time == expected
    assert event.touch_time == expected


def test_time_formats_through_http(branch: Branch) -> None:
    payload = sample("install_attributed.json")
    query = urlencode(
        {
            "id": "100000000000000050",
            "name": "INSTALL",
            "timestamp": "1893553506789",
            "last_attributed_touch_timestamp": "1893553440000",
            "last_attributed_touch_data": json.dumps(payload["last_attributed_touch_data"]),
        }
    )
    assert branch.get(query).status_code == 202
    assert branch.post(payload).status_code == 202
    for event in branch.events():
        assert stored_time(event["event_time"]) == utc(2030, 1, 2, 3, 5, 6, 789000)
        assert stored_time(event["touch_time"]) == utc(2030, 1, 2, 3, 4)


def test_event_timestamp_macro_name_is_the_event_time() -> None:
    payload = {k: v for k, v in sample("event_purchase.json").items() if k != "timestamp"}
    payload["event_timestamp"] = "1893831072131"
    assert map_postback(payload).event_time == utc(2030, 1, 5, 8, 11, 12, 131000)


@pytest.mark.parametrize(
    "install_activity",
    [
        {"install_activity": {"timestamp": 1893553506789}},
        {"install_activity_timestamp": "1893553506789"},
    ],
)
def test_install_time_of_an_in_app_event(install_activity: dict[str, Any]) -> None:
    payload = {**sample("event_purchase.json"), **install_activity}
    assert map_postback(payload).install_time == utc(2030, 1, 2, 3, 5, 6, 789000)


# -- flags --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, "true", "TRUE", "True", 1, "1", "yes"])
def test_reinstall_flag_in_custom_data(value: Any) -> None:
    payload = sample("install_attributed.json")
    payload["custom_data"] = {**payload["custom_data"], "reinstall": value}
    event = map_postback(payload)
    assert (event.kind, event.event_name) == ("reinstall", "reinstall")


@pytest.mark.parametrize("value", [False, "false", "FALSE", 0, "0", "no", "", None])
def test_reinstall_flag_false(value: Any) -> None:
    payload = sample("install_attributed.json")
    payload["custom_data"] = {**payload["custom_data"], "reinstall": value}
    assert map_postback(payload).kind == "install"


def test_reinstall_flag_in_a_get_query(branch: Branch) -> None:
    query = raw("event_open_reengagement.query").decode().strip()
    query = query.replace("name=OPEN", "name=INSTALL") + "&custom_data_reinstall=True"
    r = branch.get(query)
    assert (r.status_code, r.json()["kind"]) == (202, "reinstall")


@pytest.mark.parametrize("value", [False, "false", "False", 0, "0", "no"])
def test_attributed_flag_false_is_organic(value: Any) -> None:
    payload = {**sample("install_attributed.json"), "attributed": value}
    assert map_postback(payload).attributed is False


@pytest.mark.parametrize("value", [True, "true", "TRUE", 1, "1", "yes", None, ""])
def test_attributed_flag_true_or_absent_keeps_touch_data(value: Any) -> None:
    payload = {**sample("install_attributed.json"), "attributed": value}
    assert map_postback(payload).attributed is True


def test_attributed_true_without_touch_data_is_still_organic() -> None:
    payload = {**sample("install_organic.json"), "attributed": True}
    assert map_postback(payload).attributed is False


# -- the organic rule ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "touch",
    [None, {}, "", "{}", {"~channel": "", "~campaign": None}, {"~tags": [], "+via_features": []}],
)
def test_no_touch_data_is_organic(touch: Any) -> None:
    payload = {**sample("install_attributed.json"), "last_attributed_touch_data": touch}
    assert map_postback(payload).attributed is False


@pytest.mark.parametrize(
    "touch",
    [
        {"~channel": "Organic Search"},
        {"~advertising_partner_name": "Fake Organic Network"},
        {"~channel": "organic"},
        {"~feature": "organic", "~campaign": "organic"},
        {"~campaign": "FAKE_spring"},
    ],
)
def test_organic_words_in_touch_data_are_not_organic(touch: dict[str, Any]) -> None:
    payload = {**sample("install_attributed.json"), "last_attributed_touch_data": touch}
    assert map_postback(payload).attributed is True


def test_an_organic_sounding_channel_is_stored(branch: Branch) -> None:
    payload = {
        **sample("install_attributed.json"),
        "last_attributed_touch_data": {"~channel": "Organic Search", "~campaign": "FAKE_seo"},
    }
    r = branch.post(payload)
    assert (r.status_code, r.json()["status"]) == (202, "accepted")
    [event] = branch.events()
    assert (event["source"], event["campaign"], event["attributed"]) == (
        "Organic Search",
        "FAKE_seo",
        True,
    )


def test_facebook_organic_is_attributed_then_filtered_as_restricted(branch: Branch) -> None:
    payload = {
        **sample("install_attributed.json"),
        "last_attributed_touch_data": {"~channel": "Facebook Organic"},
    }
    assert map_postback(payload).attributed is True
    r = branch.post(payload)
    assert r.status_code == 200
    assert r.json() == {"status": "ignored", "reason": "restricted_network"}


def test_flat_touch_data_counts_as_touch_data() -> None:
    payload = {
        **sample("install_organic.json"),
        "last_attributed_touch_data_tilde_channel": "fake_network",
    }
    event = map_postback(payload)
    assert event.attributed is True and event.source == "fake_network"


# -- mapping details ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "event_name"),
    [
        ("INSTALL", "install", "install"),
        ("install", "install", "install"),
        ("REINSTALL", "reinstall", "reinstall"),
        ("OPEN", "reengagement", "OPEN"),
        ("open", "reengagement", "open"),
        ("PURCHASE", "event", "PURCHASE"),
        ("level_complete", "event", "level_complete"),
    ],
)
def test_kinds(name: str, kind: str, event_name: str) -> None:
    event = map_postback({**sample("install_attributed.json"), "name": name})
    assert (event.kind, event.event_name) == (kind, event_name)


def test_channel_and_ad_name_are_fallbacks() -> None:
    payload = sample("install_attributed.json")
    touch = payload["last_attributed_touch_data"]
    for key in ("~advertising_partner_name", "~creative_name", "~creative_id"):
        del touch[key]
    touch["~ad_name"] = "FAKE_banner_blue"
    event = map_postback(payload)
    assert (event.source, event.ad) == ("fake_network", "FAKE_banner_blue")
    assert event.ad_id is None


def test_advertising_partner_name_wins_over_channel() -> None:
    assert map_postback(sample("install_attributed.json")).source == "Fake Ad Network"


@pytest.mark.parametrize(
    ("where", "field"),
    [
        ({"$braze_install_id": "b-top"}, "b-top"),
        ({"custom_data": {"$braze_install_id": "b-custom"}}, "b-custom"),
        ({"user_data": {"os": "IOS", "$braze_install_id": "b-user"}}, "b-user"),
        ({"event_data": {"$braze_install_id": "b-event"}}, "b-event"),
        (
            {"last_attributed_touch_data": {"~channel": "x", "$braze_install_id": "b-touch"}},
            "b-touch",
        ),
        ({"custom_data_dollar_braze_install_id": "b-flat"}, "b-flat"),
        ({"user_data_dollar_braze_install_id": "b-flat-user"}, "b-flat-user"),
        ({"custom_data": json.dumps({"$braze_install_id": "b-json"})}, "b-json"),
    ],
)
def test_braze_id_from_any_object(where: dict[str, Any], field: str) -> None:
    payload = {**sample("event_purchase.json"), **where}
    assert map_postback(payload).braze_id == field


def test_braze_id_order_top_level_then_custom_then_user() -> None:
    payload = {
        **sample("event_purchase.json"),
        "custom_data": {"$braze_install_id": "b-custom"},
        "user_data": {"$braze_install_id": "b-user"},
    }
    assert map_postback(payload).braze_id == "b-custom"
    assert map_postback({**payload, "$braze_install_id": "b-top"}).braze_id == "b-top"
    payload["custom_data"] = {"$braze_install_id": "  "}  # blank: the next object's wins
    assert map_postback(payload).braze_id == "b-user"


def test_platform_from_app_platform_when_os_is_missing() -> None:
    payload = sample("install_organic.json")
    del payload["user_data"]["os"]
    assert map_postback(payload).platform == "IOS"  # the core lower-cases it


def test_nested_objects_as_json_text() -> None:
    payload = sample("install_attributed.json")
    for name in ("last_attributed_touch_data", "user_data", "custom_data"):
        payload[name] = json.dumps(payload[name])
    event = map_postback(payload)
    assert (event.source, event.google_ad_id, event.braze_id) == (
        "Fake Ad Network",
        "00000000-0000-4000-8000-0000000000a1",
        "fake-braze-device-0001",
    )


def test_revenue_as_text() -> None:
    payload = sample("event_purchase.json")
    payload["event_data"] = {"revenue": "4.99", "currency": "usd"}
    event = map_postback(payload)
    assert (event.revenue, event.currency) == (Decimal("4.99"), "usd")  # the core upper-cases


# -- ids ----------------------------------------------------------------------------------------


def test_zeroed_and_empty_ids_are_null(branch: Branch) -> None:
    payload = sample("install_attributed.json")
    payload["user_data"] = {
        "os": "IOS",
        "idfa": "00000000-0000-0000-0000-000000000000",
        "idfv": "   ",
        "aaid": "",
        "android_id": "0000000000000000",
        "developer_identity": "",
    }
    payload["custom_data"] = {"$braze_install_id": ""}
    r = branch.post(payload)
    assert r.status_code == 202, r.text
    [event] = branch.events()
    for field in ("idfa", "idfv", "google_ad_id", "android_id", "external_id", "braze_id"):
        assert event[field] is None, field


# -- unusable input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": None}, "name"),
        ({"name": ["INSTALL"]}, "name"),
        ({"timestamp": "yesterday"}, "timestamp"),
        ({"timestamp": "2030-13-45 25:61:61"}, "timestamp"),
        ({"timestamp": 10**400}, "timestamp"),
        ({"last_attributed_touch_timestamp": True}, "last_attributed_touch_timestamp"),
        ({"last_attributed_touch_data": "not json"}, "last_attributed_touch_data"),
        ({"last_attributed_touch_data": ["~channel"]}, "last_attributed_touch_data"),
        ({"user_data": {"aaid": ["a", "b"]}}, "user_data.aaid"),
        ({"event_data": {"revenue": "4,99"}}, "event_data.revenue"),
        ({"custom_data": {"$braze_install_id": {"id": 1}}}, "custom_data.$braze_install_id"),
        ({"custom_data": {"reinstall": "maybe"}}, "custom_data.reinstall"),
        ({"attributed": "maybe"}, "attributed"),
        ({"id": {"value": 1}}, "id"),
        ({"user_data_idfa": ["x"], "user_data": {}}, "user_data_idfa"),
    ],
)
def test_unusable_values_are_refused_naming_the_field(
    branch: Branch, change: dict[str, Any], field: str
) -> None:
    payload = {**sample("install_attributed.json"), **change}
    with pytest.raises(MappingError) as err:
        map_postback(payload)
    assert err.value.field == field
    r = branch.post(payload)
    assert r.status_code == 422, r.text
    assert (r.json()["status"], r.json()["field"]) == ("error", field)
    assert branch.events() == []


# -- the conformance kit ------------------------------------------------------------------------


@pytest.mark.parametrize("promise", sorted(CHECKS))
def test_conformance(promise: str) -> None:
    [partner] = load_partners(builtins=("plugins.branch",), allow=()).values()
    CHECKS[promise](partner)
