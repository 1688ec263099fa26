"""Singular end to end: every sample through HTTP into storage, the mapping rules, and the
conformance kit over the partner."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest
from litestar.testing import TestClient

from gateway import MappingError
from gateway.app import create_app
from gateway.config import Config
from gateway.conformance import CHECKS
from gateway.plugins import load_partners
from plugins.singular.mapping import map_postback
from tests.fixtures import make_config, new_key

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
URL = "/partners/singular/postback"


# -- fixtures: the real app over real storage, with Singular enabled ----------------------------


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path / "data", singular=True)


@pytest.fixture
def client(config: Config) -> Iterator[TestClient[Any]]:
    with TestClient(create_app(config)) as test_client:
        yield test_client


@pytest.fixture
def api_key(config: Config) -> str:
    return new_key(config, "singular")


def payload_of(name: str) -> dict[str, Any]:
    raw = (SAMPLES / name).read_text(encoding="utf-8")
    if name.endswith(".query"):
        return dict(parse_qsl(raw.strip(), keep_blank_values=True))
    data: dict[str, Any] = json.loads(raw)
    return data


def send_sample(client: TestClient[Any], key: str, name: str) -> Any:
    raw = (SAMPLES / name).read_bytes()
    if name.endswith(".query"):
        return client.get(f"{URL}?{raw.decode().strip()}&api_key={key}")
    return client.post(f"{URL}?api_key={key}", content=raw)


def post(client: TestClient[Any], key: str, payload: dict[str, Any]) -> Any:
    return client.post(f"{URL}?api_key={key}", content=json.dumps(payload))


def get(client: TestClient[Any], key: str, payload: dict[str, Any]) -> Any:
    return client.get(f"{URL}?{urlencode(payload)}&api_key={key}")


def stored(client: TestClient[Any], admin: dict[str, str]) -> list[dict[str, Any]]:
    r = client.get("/events?partner=singular&limit=1000", headers=admin)
    assert r.status_code == 200, r.text
    events: list[dict[str, Any]] = r.json()["events"]
    return events


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def when(value: str | None) -> datetime | None:
    """A stored time, parsed; it must be timezone-aware UTC."""
    if value is None:
        return None
    moment = datetime.fromisoformat(value)
    assert moment.utcoffset() is not None and moment.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    return moment


# -- every sample through HTTP ------------------------------------------------------------------

# file → the fields of the stored event. The first two are the shared samples
# (/work/shared/samples/singular); the last two are Singular shapes of our own.
EXPECTED: dict[str, dict[str, Any]] = {
    "event_purchase.json": {
        "kind": "event",
        "event_name": "purchase",
        "source": "Fake Network",
        "campaign": "FAKE_spring",
        "adgroup": "FAKE_group_A",
        "ad": "FAKE_banner_red",
        "platform": "android",
        "app_id": "com.example.fakeapp",
        "idfa": None,
        "idfv": None,
        "google_ad_id": "00000000-0000-4000-8000-0000000000a1",
        "braze_id": None,
        "external_id": "fake-user-0001",
        "event_time": utc(2030, 1, 5, 8, 11, 12, 131000),
        "install_time": utc(2030, 1, 2, 3, 5, 0),
        "touch_time": None,
        "revenue": 4.99,
        "currency": "USD",
    },
    "install_attributed.query": {
        "kind": "install",
        "event_name": "install",
        "source": "Fake Network",
        "campaign": "FAKE_spring",
        "adgroup": "FAKE_group_A",
        "ad": "FAKE_banner_red",
        "platform": "android",
        "idfa": None,
        "google_ad_id": "00000000-0000-4000-8000-0000000000a1",
        "braze_id": "fake-braze-device-0001",
        "event_time": utc(2030, 1, 2, 3, 5, 6, 789000),
        "install_time": utc(2030, 1, 2, 3, 5, 6, 789000),
        "revenue": None,
        "currency": None,
    },
    "install_ios_attributed.json": {
        "kind": "install",
        "event_name": "install",
        "source": "Fake Network",
        "campaign": "FAKE_spring_ios",
        "campaign_id": "fake-cmp-0002",
        "adgroup": "FAKE_group_B",
        "adgroup_id": "fake-grp-0002",
        "ad": "FAKE_banner_blue",
        "ad_id": "fake-crv-0002",
        "platform": "ios",
        "idfa": None,  # all zeros: tracking denied
        "idfv": "00000000-0000-4000-8000-0000000000b3",
        "braze_id": "fake-braze-device-0003",  # global_properties.brazeDeviceID
        "country": "US",
        "event_time": utc(2030, 1, 2, 5, 0, 0, 250000),
        "install_time": utc(2030, 1, 2, 5, 0, 0, 250000),
        "touch_time": utc(2030, 1, 2, 4, 55, 0),
    },
    "reengagement_start.json": {
        "kind": "reengagement",
        "event_name": "reengagement",
        "source": "Fake Retargeting Network",
        "campaign": "FAKE_winback",
        "adgroup": "FAKE_group_lapsed",
        "ad": "FAKE_video_15s",
        "google_ad_id": "00000000-0000-4000-8000-0000000000a4",
        "android_id": "fakeandroid00004",
        "braze_id": "fake-braze-device-0004",
        "event_time": utc(2030, 1, 6, 3, 21, 0, 750000),
        "install_time": utc(2029, 1, 1, 0, 0, 0),
        "touch_time": utc(2030, 1, 6, 3, 20, 0, 500000),
    },
}
TIME_FIELDS = ("event_time", "install_time", "touch_time")


def test_every_sample_has_an_expected_outcome() -> None:
    names = {p.name for p in SAMPLES.iterdir()}
    assert names == {*EXPECTED, "install_organic.json"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_is_accepted_and_mapped(
    client: TestClient[Any], api_key: str, admin: dict[str, str], name: str
) -> None:
    r = send_sample(client, api_key, name)
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "accepted"
    assert r.json()["kind"] == EXPECTED[name]["kind"]
    [event] = stored(client, admin)
    assert event["event_id"] == r.json()["event_id"]
    assert event["partner"] == "singular"
    assert event["attributed"] is True
    for field, want in EXPECTED[name].items():
        got = when(event[field]) if field in TIME_FIELDS else event[field]
        assert got == want, field
    assert event["raw"] == payload_of(name)  # the key is not stored
    assert "api_key" not in event["raw"]


def test_organic_install_is_ignored_and_not_stored(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    r = send_sample(client, api_key, "install_organic.json")
    assert r.status_code == 200
    assert r.json() == {"status": "ignored", "reason": "organic"}
    assert stored(client, admin) == []
    status = client.get("/partners/singular/status", headers=admin).json()
    assert status["last_success_at"] is None


def test_attributed_install_moves_last_success_but_the_purchase_does_not(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    assert send_sample(client, api_key, "event_purchase.json").status_code == 202
    assert client.get("/partners/singular/status", headers=admin).json()["last_success_at"] is None
    assert send_sample(client, api_key, "install_attributed.query").status_code == 202
    status = client.get("/partners/singular/status", headers=admin).json()
    assert status["last_success_at"] is not None


# -- retries: the same postback delivered again is stored once ----------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_singular_retry_is_stored_once(
    client: TestClient[Any], api_key: str, admin: dict[str, str], name: str
) -> None:
    first = send_sample(client, api_key, name)
    assert first.status_code == 202, first.text
    for _ in range(5):  # Singular retries up to five times after a 5xx
        again = send_sample(client, api_key, name)
        assert again.status_code == 200, again.text
        assert again.json() == {"status": "duplicate", "event_id": first.json()["event_id"]}
    assert len(stored(client, admin)) == 1


def test_retry_with_a_rotated_key_in_a_header_is_still_a_duplicate(
    client: TestClient[Any], config: Config, api_key: str, admin: dict[str, str]
) -> None:
    """A retry an hour later may carry a new key, sent another way: the key is not part of the
    event, so it is still the same event."""
    query = (SAMPLES / "install_attributed.query").read_text().strip()
    first = client.get(f"{URL}?{query}&api_key={api_key}")
    assert first.status_code == 202, first.text
    rotated = new_key(config, "singular")
    again = client.get(f"{URL}?{query}", headers={"X-Api-Key": rotated})
    assert again.status_code == 200, again.text
    assert again.json() == {"status": "duplicate", "event_id": first.json()["event_id"]}
    assert len(stored(client, admin)) == 1


def test_a_second_purchase_is_not_taken_for_a_retry(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    purchase = payload_of("event_purchase.json")
    assert post(client, api_key, purchase).status_code == 202
    later = {**purchase, "event_utc_timestamp": "1893831999.5"}
    r = post(client, api_key, later)
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "accepted"
    assert len(stored(client, admin)) == 2


def test_dedupe_key_is_a_hash_of_the_payload() -> None:
    event = map_postback(payload_of("event_purchase.json"))
    assert event.dedupe_key.startswith("sha256:")
    assert map_postback(payload_of("event_purchase.json")).dedupe_key == event.dedupe_key


# -- times: each format Singular sends, to the exact UTC moment ---------------------------------


def _purchase_with(**changes: Any) -> dict[str, Any]:
    return {**payload_of("event_purchase.json"), **changes}


def test_time_epoch_seconds_as_a_json_number(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    r = post(client, api_key, _purchase_with(event_utc_timestamp=1893831072))
    assert r.status_code == 202, r.text
    [event] = stored(client, admin)
    assert when(event["event_time"]) == utc(2030, 1, 5, 8, 11, 12)


def test_time_epoch_seconds_with_a_fraction_as_a_json_number(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    r = post(client, api_key, _purchase_with(event_utc_timestamp=1893831072.131))
    assert r.status_code == 202, r.text
    [event] = stored(client, admin)
    assert when(event["event_time"]) == utc(2030, 1, 5, 8, 11, 12, 131000)


def test_time_epoch_seconds_as_a_string(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    r = post(client, api_key, _purchase_with(install_utc_timestamp="1893553500"))
    assert r.status_code == 202, r.text
    [event] = stored(client, admin)
    assert when(event["install_time"]) == utc(2030, 1, 2, 3, 5, 0)


def test_time_epoch_seconds_with_a_fraction_as_a_string(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    r = post(client, api_key, _purchase_with(event_utc_timestamp="1893831072.131"))
    assert r.status_code == 202, r.text
    [event] = stored(client, admin)
    assert when(event["event_time"]) == utc(2030, 1, 5, 8, 11, 12, 131000)


def test_time_epoch_milliseconds_in_a_get_query(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    query = {**payload_of("install_attributed.query"), "utc": "1893553506789"}
    r = get(client, api_key, query)
    assert r.status_code == 202, r.text
    [event] = stored(client, admin)
    assert when(event["event_time"]) == utc(2030, 1, 2, 3, 5, 6, 789000)
    assert when(event["install_time"]) == utc(2030, 1, 2, 3, 5, 6, 789000)


def test_time_epoch_seconds_in_a_get_query(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    query = {**payload_of("install_attributed.query"), "utc": "1893553506"}
    r = get(client, api_key, query)
    assert r.status_code == 202, r.text
    [event] = stored(client, admin)
    assert when(event["event_time"]) == utc(2030, 1, 2, 3, 5, 6)


def test_click_time_is_the_touch_time() -> None:
    event = map_postback(_purchase_with(click_utc_timestamp="1893553000.5"))
    assert event.touch_time == utc(2030, 1, 2, 2, 56, 40, 500000)


def test_event_time_falls_back_to_the_install_time() -> None:
    payload = _purchase_with()
    del payload["event_utc_timestamp"]
    event = map_postback(payload)
    assert event.event_time == event.install_time == utc(2030, 1, 2, 3, 5, 0)


# -- flags: is_organic and is_reengagement in every form Singular sends -------------------------

TRUE_FORMS = [1, "1", True, "true", "True", "TRUE", "yes"]
FALSE_FORMS = [0, "0", False, "false", "False", "no"]


@pytest.mark.parametrize("value", TRUE_FORMS, ids=repr)
def test_is_organic_true_in_every_form(value: Any) -> None:
    assert map_postback(_purchase_with(is_organic=value)).attributed is False


@pytest.mark.parametrize("value", FALSE_FORMS, ids=repr)
def test_is_organic_false_in_every_form(value: Any) -> None:
    assert map_postback(_purchase_with(is_organic=value)).attributed is True


@pytest.mark.parametrize("value", TRUE_FORMS, ids=repr)
def test_is_reengagement_true_in_every_form(value: Any) -> None:
    event = map_postback({**payload_of("install_attributed.query"), "is_reengagement": value})
    assert (event.kind, event.event_name) == ("reengagement", "reengagement")


@pytest.mark.parametrize("value", FALSE_FORMS, ids=repr)
def test_is_reengagement_false_in_every_form(value: Any) -> None:
    event = map_postback({**payload_of("install_attributed.query"), "is_reengagement": value})
    assert (event.kind, event.event_name) == ("install", "install")


def test_organic_flag_in_a_get_query_is_ignored_over_http(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    r = get(client, api_key, {**payload_of("install_attributed.query"), "is_organic": "1"})
    assert (r.status_code, r.json()) == (200, {"status": "ignored", "reason": "organic"})
    assert stored(client, admin) == []


@pytest.mark.parametrize(
    "changes",
    [{"network": ""}, {"network": "Organic"}, {"network": "ORGANIC"}, {"network": "unattributed"}],
    ids=repr,
)
def test_organic_by_network(changes: dict[str, Any]) -> None:
    payload = {**payload_of("install_attributed.query"), **changes}
    assert map_postback(payload).attributed is False


def test_organic_without_a_network_field() -> None:
    payload = payload_of("install_attributed.query")
    del payload["network"]
    assert map_postback(payload).attributed is False


# -- kinds and names ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reengagement", "kind", "event_name"),
    [
        ("__START__", "0", "install", "install"),
        ("__INSTALL__", "0", "install", "install"),
        ("__REINSTALL__", "0", "reinstall", "reinstall"),
        ("__START__", "1", "reengagement", "reengagement"),
        ("purchase", "1", "reengagement", "purchase"),
        ("purchase", "0", "event", "purchase"),
        ("__SESSION__", "0", "event", "__SESSION__"),
    ],
)
def test_kinds(name: str, reengagement: str, kind: str, event_name: str) -> None:
    payload = {**payload_of("event_purchase.json"), "event_name": name}
    payload["is_reengagement"] = reengagement
    event = map_postback(payload)
    assert (event.kind, event.event_name) == (kind, event_name)


def test_bi_names_win_over_get_names() -> None:
    payload = {
        **payload_of("event_purchase.json"),
        "adgroup": "get-adgroup",
        "creative": "get-creative",
        "event": "get-event",
        "utc": "1893553506789",
    }
    event = map_postback(payload)
    assert (event.adgroup, event.ad, event.event_name) == (
        "FAKE_group_A",
        "FAKE_banner_red",
        "purchase",
    )
    assert event.event_time == utc(2030, 1, 5, 8, 11, 12, 131000)  # event_utc_timestamp


def test_amount_is_the_revenue_when_revenue_is_absent() -> None:
    payload = _purchase_with(amount=12.5)
    del payload["revenue"]
    assert map_postback(payload).revenue == Decimal("12.5")


# -- the Braze id -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where",
    [
        {"appboyUserID": "b-1"},
        {"brazeDeviceID": "b-1"},
        {"AppboyUserId": "b-1"},
        {"global_properties": {"brazeDeviceID": "b-1"}},
        {"global_properties": json.dumps({"brazeDeviceID": "b-1"})},
        {"event_arguments": {"appboyUserID": "b-1"}},
        {"arguments": {"appboyUserID": "b-1"}},
    ],
    ids=repr,
)
def test_braze_id_sources(where: dict[str, Any]) -> None:
    assert map_postback({**payload_of("event_purchase.json"), **where}).braze_id == "b-1"


def test_top_level_braze_id_wins_over_global_properties() -> None:
    payload = {
        **payload_of("event_purchase.json"),
        "appboyUserID": "top",
        "global_properties": {"brazeDeviceID": "nested"},
    }
    assert map_postback(payload).braze_id == "top"


# -- ids: zeroed or empty ids are null ----------------------------------------------------------


def test_zeroed_and_empty_ids_are_stored_as_null(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    payload = {
        **payload_of("install_attributed.query"),
        "aifa": "00000000-0000-0000-0000-000000000000",
        "idfa": "",
        "idfv": "   ",
        "andi": "0000000000000000",
        "appboyUserID": "00000000-0000-0000-0000-000000000000",
    }
    r = get(client, api_key, payload)
    assert r.status_code == 202, r.text
    [event] = stored(client, admin)
    for field in ("google_ad_id", "idfa", "idfv", "android_id", "braze_id"):
        assert event[field] is None, field
    # The mapping itself already gives null, before the core's own pass.
    mapped = map_postback(payload)
    assert (mapped.google_ad_id, mapped.idfa, mapped.idfv) == (None, None, None)
    assert (mapped.android_id, mapped.braze_id) == (None, None)


def test_unfilled_macros_are_null() -> None:
    payload = {**payload_of("install_attributed.query"), "aifa": "{AIFA}", "creative": "{CREATIVE}"}
    event = map_postback(payload)
    assert (event.google_ad_id, event.ad) == (None, None)


# -- unusable values: 422 naming Singular's field -----------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"event_utc_timestamp": "yesterday"}, "event_utc_timestamp"),
        ({"install_utc_timestamp": "2030-13-45"}, "install_utc_timestamp"),
        ({"click_utc_timestamp": "99999999999999999999999"}, "click_utc_timestamp"),
        ({"is_organic": "maybe"}, "is_organic"),
        ({"is_reengagement": 2}, "is_reengagement"),
        ({"revenue": "4,99"}, "revenue"),
        ({"revenue": None, "amount": "lots"}, "amount"),
        ({"event_name": ["purchase"]}, "event_name"),
        ({"event_name": ""}, "event_name"),
        ({"global_properties": "not json"}, "global_properties"),
        ({"brazeDeviceID": {"id": 1}}, "brazeDeviceID"),
        ({"event_arguments": {"appboyUserID": ["x"]}}, "event_arguments.appboyUserID"),
    ],
    ids=repr,
)
def test_unusable_value_is_refused_naming_the_field(
    client: TestClient[Any],
    api_key: str,
    admin: dict[str, str],
    changes: dict[str, Any],
    field: str,
) -> None:
    r = post(client, api_key, _purchase_with(**changes))
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field
    assert r.json()["error"] == "invalid_payload"
    assert stored(client, admin) == []


def test_unusable_time_in_a_get_query_names_utc(client: TestClient[Any], api_key: str) -> None:
    r = get(client, api_key, {**payload_of("install_attributed.query"), "utc": "soon"})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "utc"


def test_get_postback_without_an_event_name_names_event_name() -> None:
    payload = payload_of("install_attributed.query")
    del payload["event"]
    with pytest.raises(MappingError) as err:
        map_postback(payload)
    assert err.value.field == "event_name"


# -- the conformance kit ------------------------------------------------------------------------


def test_partner_is_registered_for_get_and_post() -> None:
    [partner] = load_partners(builtins=("plugins.singular",), allow=()).values()
    assert partner.spec.name == "singular"
    assert partner.spec.display_name == "Singular"
    assert set(partner.spec.methods) == {"GET", "POST"}
    assert partner.spec.docs_url.startswith("https://support.singular.net/")


@pytest.mark.parametrize("promise", sorted(CHECKS))
def test_conformance(promise: str) -> None:
    [partner] = load_partners(builtins=("plugins.singular",), allow=()).values()
    CHECKS[promise](partner)
