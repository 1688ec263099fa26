"""Every input kind real partners send reaches the real app and is stored with the right values.

Each test posts to ``/partners/kochava/postback`` on the real app (Litestar TestClient over
``create_app`` with SQLite in a temporary folder) and reads what was stored back through
``GET /events``. No response may ever be a 5xx: :func:`call` checks that on every request, and
:func:`test_no_input_is_ever_answered_with_a_5xx` runs the whole catalogue of inputs in one go.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import msgspec
import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.config import Config
from tests.fixtures import IOS_FIELDS, LiveGateway, kochava_samples, make_config, new_key

URL = "/partners/kochava/postback"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
JSON = {"Content-Type": "application/json"}

IOS = "install_ios_attributed.json"
ANDROID = "install_android_identity_link.json"
PURCHASE = "event_reengagement_purchase.json"
ORGANIC = "install_organic.json"
ZEROED = "install_ios_zeroed_idfa.json"
UNICODE = "install_unicode_names.json"

T = datetime(2024, 5, 1, 12, 4, 41, tzinfo=UTC)
T_MS = datetime(2024, 5, 1, 12, 4, 41, 123000, tzinfo=UTC)
EPOCH_S = 1714565081  # 2024-05-01T12:04:41Z

IOS_TIMES = {
    "install_time": T,
    "event_time": T,
    "touch_time": datetime(2024, 5, 1, 12, 0, 3, tzinfo=UTC),
}
# Fields the gateway fills per request; everything else is the mapping.
PER_REQUEST = {"event_id", "received_at", "raw", "dedupe_key"}


# -- helpers ------------------------------------------------------------------------------------


def sample(name: str, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(kochava_samples()[name])
    data.update(changes)
    return data


def without(data: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in names}


def form(data: dict[str, Any]) -> bytes:
    return urlencode(data).encode("ascii")


def check(response: httpx.Response) -> httpx.Response:
    """Every answer: never a 5xx, always JSON with a status."""
    assert response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    assert isinstance(body, dict) and body.get("status"), response.text
    if response.status_code >= 400:
        assert body["status"] == "error"
        assert isinstance(body.get("reason"), str) and body["reason"].strip()
    return response


def call(client: TestClient[Any], method: str, url: str, **kwargs: Any) -> httpx.Response:
    return check(client.request(method, url, **kwargs))


def post(
    client: TestClient[Any], key: str | None, query: str = "", **kwargs: Any
) -> httpx.Response:
    parts = [f"api_key={key}"] if key else []
    if query:
        parts.append(query)
    url = URL + ("?" + "&".join(parts) if parts else "")
    return call(client, "POST", url, **kwargs)


def get(client: TestClient[Any], key: str | None, query: str = "", **kwargs: Any) -> httpx.Response:
    parts = [f"api_key={key}"] if key else []
    if query:
        parts.append(query)
    url = URL + ("?" + "&".join(parts) if parts else "")
    return call(client, "GET", url, **kwargs)


def events(client: TestClient[Any], admin: dict[str, str]) -> list[dict[str, Any]]:
    response = client.get("/events", headers=admin, params={"limit": "1000"})
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["events"]
    return found


def only_event(client: TestClient[Any], admin: dict[str, str]) -> dict[str, Any]:
    stored = events(client, admin)
    assert len(stored) == 1, stored
    return stored[0]


def by_id(client: TestClient[Any], admin: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {e["event_id"]: e for e in events(client, admin)}


def when(value: str | None) -> datetime:
    """A stored time: must be present and in UTC."""
    assert value is not None
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert moment.utcoffset() == timedelta(0), value
    return moment


def accepted(response: httpx.Response) -> str:
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "accepted"
    assert isinstance(body["event_id"], str) and body["event_id"]
    return str(body["event_id"])


def assert_ios(event: dict[str, Any]) -> None:
    for name, value in IOS_FIELDS.items():
        assert event[name] == value, (name, event[name])
    for name, moment in IOS_TIMES.items():
        assert when(event[name]) == moment, name
    assert when(event["received_at"]) > datetime(2024, 6, 1, tzinfo=UTC)
    assert "api_key" not in event["raw"]


def mapped(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k not in PER_REQUEST}


def client_for(config: Config) -> TestClient[Any]:
    return TestClient(create_app(config))


# -- 1. JSON ------------------------------------------------------------------------------------


def test_json_body_is_mapped(client: TestClient[Any], api_key: str, admin: dict[str, str]) -> None:
    payload = sample(IOS)
    response = post(client, api_key, json=payload)
    event_id = accepted(response)
    assert response.json() == {"status": "accepted", "event_id": event_id, "kind": "install"}
    event = only_event(client, admin)
    assert event["event_id"] == event_id
    assert_ios(event)
    assert event["raw"] == payload


def test_json_android_identity_link(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    accepted(post(client, api_key, json=sample(ANDROID)))
    event = only_event(client, admin)
    assert event["kind"] == "install"
    assert event["platform"] == "android"
    assert event["app_id"] == "com.example.fakeapp"
    assert event["google_ad_id"] == "77777777-8888-4EEE-8FFF-999999999999"
    assert event["android_id"] == "fakeandroid00002"
    assert event["idfa"] is None
    assert event["braze_id"] == "fake-braze-device-0000-0000-000000000002"
    assert event["source"] == "Example Video Network"
    assert event["adgroup"] == "app_8812"
    assert event["country"] == "DE"
    assert when(event["install_time"]) == datetime(2024, 5, 2, 8, 15, tzinfo=UTC)
    assert event["raw"]["is_first_install"] is True
    assert event["raw"]["identity_link"] == {"braze_id": "fake-braze-device-0000-0000-000000000002"}


def test_json_reengagement_purchase(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    response = post(client, api_key, json=sample(PURCHASE))
    accepted(response)
    assert response.json()["kind"] == "reengagement"
    event = only_event(client, admin)
    assert event["kind"] == "reengagement"
    assert event["event_name"] == "purchase"
    assert event["revenue"] == 4.99
    assert event["currency"] == "USD"
    assert when(event["event_time"]) == datetime(2024, 5, 20, 21, 0, tzinfo=UTC)
    assert event["install_time"] is None
    assert event["braze_id"] == "fake-braze-device-0000-0000-000000000004"
    assert event["dedupe_key"] == "fake-txn-0004"


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "APPLICATION/JSON"]
)
def test_json_with_json_content_types(
    client: TestClient[Any], api_key: str, admin: dict[str, str], content_type: str
) -> None:
    body = json.dumps(sample(IOS), ensure_ascii=False).encode("utf-8")
    accepted(post(client, api_key, content=body, headers={"Content-Type": content_type}))
    assert_ios(only_event(client, admin))


def test_json_with_byte_order_mark_and_whitespace(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    body = b"\xef\xbb\xbf \r\n\t" + json.dumps(sample(IOS)).encode() + b"\n"
    accepted(post(client, api_key, content=body, headers=JSON))
    assert_ios(only_event(client, admin))


# -- 2. form-encoded ----------------------------------------------------------------------------


def test_form_body_maps_the_same_fields_as_json(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    as_json = sample(IOS)
    as_form = sample(IOS, transaction_id="fake-txn-form")
    json_id = accepted(post(client, api_key, json=as_json))
    form_id = accepted(post(client, api_key, content=form(as_form), headers=FORM))
    stored = by_id(client, admin)
    from_json, from_form = stored[json_id], stored[form_id]
    assert_ios(from_json)
    assert from_form["dedupe_key"] == "fake-txn-form"
    assert mapped(from_form) == mapped(from_json)
    assert from_form["raw"] == as_form  # every value of the sample is text
    for name, moment in IOS_TIMES.items():
        assert when(from_form[name]) == moment


@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "application/x-www-form-urlencoded; charset=UTF-8"],
)
def test_form_body_content_types(
    client: TestClient[Any], api_key: str, admin: dict[str, str], content_type: str
) -> None:
    accepted(
        post(client, api_key, content=form(sample(IOS)), headers={"Content-Type": content_type})
    )
    event = only_event(client, admin)
    assert_ios(event)
    assert event["raw"] == sample(IOS)


def test_form_body_with_identity_link_as_json_text(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    payload = sample(ANDROID)
    payload["identity_link"] = json.dumps(payload["identity_link"])
    payload["is_first_install"] = "true"
    accepted(post(client, api_key, content=form(payload), headers=FORM))
    event = only_event(client, admin)
    assert event["braze_id"] == "fake-braze-device-0000-0000-000000000002"
    assert event["google_ad_id"] == "77777777-8888-4EEE-8FFF-999999999999"
    assert (
        event["raw"]["identity_link"] == '{"braze_id": "fake-braze-device-0000-0000-000000000002"}'
    )


def test_form_body_plus_and_percent_encoding_are_decoded_once(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    body = (
        "event_name=_install&attribution_type=install&network_name=Spring+Network"
        "&campaign_name="
        + quote("夏のセール", safe="")
        + "+"
        + quote("🎉", safe="")
        + "&adgroup_name=100%25+off&creative_name=a%2Bb&site_id=%2520"
        "&install_time=2024-05-01T12%3A04%3A41%2B0000&transaction_id=form-enc"
    ).encode("ascii")
    accepted(post(client, api_key, content=body, headers=FORM))
    event = only_event(client, admin)
    assert event["source"] == "Spring Network"
    assert event["campaign"] == "夏のセール 🎉"
    assert event["adgroup"] == "100% off"
    assert event["ad"] == "a+b"
    assert event["adgroup_id"] == "%20"  # decoded once: "%2520" is the text "%20"
    assert when(event["install_time"]) == T


# -- 3. everything in the query string ----------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_query_string_only(
    client: TestClient[Any], api_key: str, admin: dict[str, str], method: str
) -> None:
    payload = sample(IOS)
    url = f"{URL}?api_key={api_key}&{urlencode(payload)}"
    response = call(client, method, url)
    event_id = accepted(response)
    event = only_event(client, admin)
    assert event["event_id"] == event_id
    assert_ios(event)
    assert event["raw"] == payload


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_query_string_percent_encoded_utf8_and_plus(
    client: TestClient[Any], api_key: str, admin: dict[str, str], method: str
) -> None:
    campaign = "夏のセール 🎉"
    query = (
        "event_name=_install&attribution_type=install&network_name=Spring+Network"
        # '+' for the space between the words, the rest percent-encoded UTF-8
        "&campaign_name="
        + quote("夏のセール", safe="")
        + "+"
        + quote("🎉", safe="")
        + "&adgroup_name="
        + quote("Réseau Démo", safe="")  # space as %20
        + "&creative_name=a%2Bb+c"  # an encoded '+' stays a '+'
        + "&site_id=100%25"  # an encoded '%' stays a '%'
        + "&campaign_id=%2541"  # decoded once: "%41", not "A"
        + "&install_time=2024-05-01T12%3A04%3A41%2B0000"
        + "&transaction_id=query-utf8"
    )
    url = f"{URL}?api_key={api_key}&{query}"
    response = call(client, method, url)
    assert response.request.url.query.endswith(query.encode("ascii"))  # sent as written
    accepted(response)
    event = only_event(client, admin)
    assert event["campaign"] == campaign
    assert event["source"] == "Spring Network"
    assert event["adgroup"] == "Réseau Démo"
    assert event["ad"] == "a+b c"
    assert event["adgroup_id"] == "100%"
    assert event["campaign_id"] == "%41"
    assert when(event["install_time"]) == T
    assert event["raw"]["campaign_name"] == campaign
    assert event["raw"]["campaign_id"] == "%41"


def test_json_values_are_not_percent_decoded(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    # Percent-decoding belongs to query strings and form bodies only: JSON text is kept as sent.
    payload = sample(IOS, campaign_name="100%25+off", site_id="a%20b")
    accepted(post(client, api_key, json=payload))
    event = only_event(client, admin)
    assert event["campaign"] == "100%25+off"
    assert event["adgroup"] == "a%20b"
    assert event["raw"] == payload


def test_query_string_unencoded_plus_in_a_time_is_a_space(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    # "+0000" sent raw is " 0000" after decoding: refused with the field named, never guessed.
    query = "network_name=N&event_name=_install&install_time=2024-05-01T12:04:41+0000"
    response = get(client, api_key, query)
    assert response.status_code == 422
    assert response.json()["field"] == "install_time"
    assert events(client, admin) == []


def test_get_with_identity_link_json_in_query(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    payload = sample(ANDROID)
    payload["identity_link"] = json.dumps({"brazeId": "braze-q", "user_id": "user-q"})
    accepted(get(client, api_key, urlencode(payload)))
    event = only_event(client, admin)
    assert event["braze_id"] == "braze-q"
    assert event["external_id"] == "user-q"
    assert event["platform"] == "android"


def test_query_fields_merge_under_a_json_body(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    payload = without(sample(IOS), "platform", "country")
    payload["campaign_name"] = "from_body"
    accepted(
        post(client, api_key, "platform=ios&country=US&campaign_name=from_query", json=payload)
    )
    event = only_event(client, admin)
    assert event["platform"] == "ios"
    assert event["country"] == "US"
    assert event["campaign"] == "from_body"  # the body wins over the query string
    assert event["raw"]["platform"] == "ios"
    assert "api_key" not in event["raw"]


def test_repeated_query_field_first_wins(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    payload = without(sample(IOS), "campaign_name")
    accepted(get(client, api_key, urlencode(payload) + "&campaign_name=first&campaign_name=second"))
    assert only_event(client, admin)["campaign"] == "first"


# -- 4. JSON with a wrong or missing Content-Type -----------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "text/plain; charset=utf-8",
        "application/x-www-form-urlencoded",
        "application/octet-stream",
        "text/html",
        "",
        None,
    ],
)
def test_json_with_wrong_or_missing_content_type(
    client: TestClient[Any], api_key: str, admin: dict[str, str], content_type: str | None
) -> None:
    body = json.dumps(sample(IOS), ensure_ascii=False).encode("utf-8")
    headers = {} if content_type is None else {"Content-Type": content_type}
    request = client.build_request(
        "POST", f"{URL}?api_key={api_key}", content=body, headers=headers
    )
    if content_type is None:
        assert "content-type" not in request.headers
    else:
        assert request.headers["content-type"] == content_type
    event_id = accepted(check(client.send(request)))
    event = only_event(client, admin)
    assert event["event_id"] == event_id
    assert_ios(event)
    assert event["raw"] == sample(IOS)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_json_batch_with_wrong_or_missing_content_type(
    client: TestClient[Any], api_key: str, admin: dict[str, str], content_type: str | None
) -> None:
    body = json.dumps([sample(IOS), sample(ANDROID)]).encode()
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = post(client, api_key, content=body, headers=headers)
    assert response.status_code == 202
    assert response.json()["accepted"] == 2
    assert {e["dedupe_key"] for e in events(client, admin)} == {"fake-txn-0001", "fake-txn-0002"}


# -- 5. batches ---------------------------------------------------------------------------------


def test_batch_of_different_postbacks(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    response = post(client, api_key, json=[sample(IOS), sample(ANDROID), sample(PURCHASE)])
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "accepted"
    assert (body["accepted"], body["duplicate"], body["ignored"]) == (3, 0, 0)
    results = body["results"]
    assert [r["status"] for r in results] == ["accepted"] * 3
    assert [r["kind"] for r in results] == ["install", "install", "reengagement"]
    stored = by_id(client, admin)
    assert set(stored) == {r["event_id"] for r in results}
    ios, android, purchase = (stored[r["event_id"]] for r in results)
    assert_ios(ios)
    assert ios["raw"] == sample(IOS)
    assert android["braze_id"] == "fake-braze-device-0000-0000-000000000002"
    assert android["google_ad_id"] == "77777777-8888-4EEE-8FFF-999999999999"
    assert purchase["revenue"] == 4.99
    assert purchase["kind"] == "reengagement"
    assert purchase["event_name"] == "purchase"


def test_batch_mixing_organic_and_attributed(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    response = post(client, api_key, json=[sample(ORGANIC), sample(IOS)])
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "accepted"
    assert (body["accepted"], body["duplicate"], body["ignored"]) == (1, 0, 1)
    assert body["results"][0] == {"status": "ignored", "reason": "organic"}
    assert body["results"][1]["status"] == "accepted"
    event = only_event(client, admin)
    assert event["event_id"] == body["results"][1]["event_id"]
    assert_ios(event)


def test_batch_of_only_organic_installs_is_ignored(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    second = sample(ORGANIC, transaction_id="fake-txn-organic-2", attribution="false")
    response = post(client, api_key, json=[sample(ORGANIC), second])
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ignored"
    assert body["results"] == [{"status": "ignored", "reason": "organic"}] * 2
    assert events(client, admin) == []


@pytest.mark.parametrize(
    ("bad_index", "change", "field"),
    [
        (1, {"install_time": "yesterday"}, "install_time"),
        (2, {"attribution": "maybe"}, "attribution"),
        (0, {"event_name": None, "attribution_type": None}, "event_name"),
        (2, {"click_time": "2024-13-45"}, "click_time"),
    ],
)
def test_batch_with_one_invalid_item_stores_nothing(
    client: TestClient[Any],
    api_key: str,
    admin: dict[str, str],
    bad_index: int,
    change: dict[str, Any],
    field: str,
) -> None:
    items = [sample(IOS), sample(ANDROID), sample(PURCHASE)]
    items[bad_index].update(change)
    response = post(client, api_key, json=items)
    assert response.status_code == 422
    body = response.json()
    assert body["field"] == f"[{bad_index}].{field}"
    assert f"[{bad_index}].{field}" in body["reason"]
    assert events(client, admin) == []


def test_batch_retry_is_answered_duplicate_with_the_same_ids(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    items = [sample(IOS), sample(ANDROID)]
    first = post(client, api_key, json=items)
    assert first.status_code == 202
    again = post(client, api_key, json=items)
    assert again.status_code == 200
    body = again.json()
    assert body["status"] == "duplicate"
    assert (body["accepted"], body["duplicate"]) == (0, 2)
    assert [r["event_id"] for r in body["results"]] == [
        r["event_id"] for r in first.json()["results"]
    ]
    assert len(events(client, admin)) == 2


def test_batch_items_get_the_query_string_fields(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    items = [
        without(sample(IOS), "country"),
        without(sample(ZEROED), "country") | {"country": "fr"},
    ]
    response = post(client, api_key, "country=JP", json=items)
    assert response.status_code == 202
    countries = {e["dedupe_key"]: e["country"] for e in events(client, admin)}
    assert countries == {"fake-txn-0001": "JP", "fake-txn-0005": "FR"}


def test_empty_batch_is_400(client: TestClient[Any], api_key: str, admin: dict[str, str]) -> None:
    response = post(client, api_key, content=b"[]", headers=JSON)
    assert response.status_code == 400
    assert "empty" in response.json()["reason"]
    response = post(client, api_key, content=b"  [ ]  ", headers={"Content-Type": "text/plain"})
    assert response.status_code == 400
    assert events(client, admin) == []


@pytest.mark.parametrize(
    ("items", "index"),
    [
        ([1, 2], 0),
        (["a", "b"], 0),
        ([None], 0),
        ([[{"event_name": "_install"}]], 0),
        ([{"network_name": "n", "event_name": "_install", "transaction_id": "x"}, 3], 1),
        ([{"event_name": "_install"}, {"event_name": "_install"}, True], 2),
    ],
)
def test_batch_of_non_objects_is_400(
    client: TestClient[Any], api_key: str, admin: dict[str, str], items: list[Any], index: int
) -> None:
    response = post(client, api_key, json=items)
    assert response.status_code == 400
    assert f"item {index}" in response.json()["reason"]
    assert events(client, admin) == []


def test_batch_over_the_default_limit_is_413(
    client: TestClient[Any], api_key: str, admin: dict[str, str], config: Config
) -> None:
    limit = config.limits.max_batch_events
    assert limit == 50
    items = [
        {"event_name": "_install", "network_name": "N", "transaction_id": f"t{i}"}
        for i in range(limit + 1)
    ]
    body = json.dumps(items).encode()
    assert len(body) < config.limits.max_body_bytes  # refused for the count, not the size
    response = post(client, api_key, content=body, headers=JSON)
    assert response.status_code == 413
    assert str(limit) in response.json()["reason"]
    assert events(client, admin) == []
    # Exactly the limit is fine.
    response = post(client, api_key, content=json.dumps(items[:limit]).encode(), headers=JSON)
    assert response.status_code == 202
    assert response.json()["accepted"] == limit
    assert len(events(client, admin)) == limit


def test_batch_over_a_configured_limit_is_413(tmp_path: Path, admin: dict[str, str]) -> None:
    config = make_config(tmp_path / "data")
    config.limits.max_batch_events = 2
    key = new_key(config)
    with client_for(config) as client:
        response = post(client, key, json=[sample(IOS), sample(ANDROID), sample(PURCHASE)])
        assert response.status_code == 413
        assert response.json()["error"] == "payload_too_large"
        assert "limit of 2" in response.json()["reason"]
        assert events(client, admin) == []
        response = post(client, key, json=[sample(IOS), sample(ANDROID)])
        assert response.status_code == 202
        assert len(events(client, admin)) == 2


# -- 6. numbers where text is expected, text where numbers are -------------------------------------


def test_numbers_where_strings_are_expected(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    payload = without(sample(IOS), "campaign_name")
    payload.update(site_id=8812, campaign_id=123, network_id=9999, creative_id=42)
    accepted(post(client, api_key, json=payload))
    event = only_event(client, admin)
    assert event["adgroup"] == "8812"
    assert event["adgroup_id"] == "8812"
    assert event["campaign"] == "123"
    assert event["campaign_id"] == "123"
    assert event["source_id"] == "9999"
    assert event["ad"] == "42"
    assert event["ad_id"] == "42"
    # The raw payload keeps what was sent.
    assert event["raw"]["site_id"] == 8812
    assert event["raw"]["campaign_id"] == 123


def test_whole_floats_where_ids_are_expected(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    payload = sample(IOS, site_id=8812.0, network_id=9999.0, campaign_id=123.5)
    accepted(post(client, api_key, json=payload))
    event = only_event(client, admin)
    assert event["adgroup_id"] == "8812"
    assert event["source_id"] == "9999"
    assert event["campaign_id"] == "123.5"


@pytest.mark.parametrize(
    ("fields", "revenue"),
    [
        ({"event_value": "4.99"}, 4.99),
        ({"event_value": 4.99}, 4.99),
        ({"event_value": " 10 "}, 10),
        ({"event_value": 0}, 0),
        ({"revenue": "12.50", "event_value": "4.99"}, 12.5),
        ({"revenue": 7}, 7),
        ({"event_value": '{"sku": "a"}'}, None),  # free-form event_value: no revenue
    ],
)
def test_strings_where_numbers_are_expected(
    client: TestClient[Any],
    api_key: str,
    admin: dict[str, str],
    fields: dict[str, Any],
    revenue: float | None,
) -> None:
    payload = without(sample(PURCHASE), "event_value")
    payload.update(fields)
    accepted(post(client, api_key, json=payload))
    event = only_event(client, admin)
    assert event["revenue"] == revenue
    if revenue is not None:
        assert isinstance(event["revenue"], int | float)  # a JSON number, not text


@pytest.mark.parametrize("transport", ["form", "query"])
def test_revenue_as_text_in_form_and_query(
    client: TestClient[Any], api_key: str, admin: dict[str, str], transport: str
) -> None:
    payload = without(sample(PURCHASE), "identity_link")
    if transport == "form":
        accepted(post(client, api_key, content=form(payload), headers=FORM))
    else:
        accepted(get(client, api_key, urlencode(payload)))
    event = only_event(client, admin)
    assert event["revenue"] == 4.99
    assert event["currency"] == "USD"


def test_unusable_revenue_is_422(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    response = post(client, api_key, json=sample(PURCHASE, revenue="4,99 EUR"))
    assert response.status_code == 422
    assert response.json()["field"] == "revenue"
    assert events(client, admin) == []


# -- 7. flags -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["false", "FALSE", "False", "0", 0, False, "no", " false "])
def test_attribution_false_is_organic_and_ignored(
    client: TestClient[Any], api_key: str, admin: dict[str, str], value: Any
) -> None:
    response = post(client, api_key, json=sample(IOS, attribution=value))
    assert response.status_code == 200
    assert response.json() == {"status": "ignored", "reason": "organic"}
    assert events(client, admin) == []


@pytest.mark.parametrize("value", ["true", "TRUE", "1", 1, True, "yes", "Yes"])
def test_attribution_true_is_attributed(
    client: TestClient[Any], api_key: str, admin: dict[str, str], value: Any
) -> None:
    accepted(post(client, api_key, json=sample(IOS, attribution=value)))
    event = only_event(client, admin)
    assert event["attributed"] is True
    assert event["raw"]["attribution"] == value
    assert_ios(event)


@pytest.mark.parametrize(("value", "organic"), [("false", True), ("0", True), ("true", False)])
def test_attribution_flag_in_query_and_form(
    client: TestClient[Any], api_key: str, admin: dict[str, str], value: str, organic: bool
) -> None:
    payload = sample(IOS, attribution=value)
    by_query = get(client, api_key, urlencode(payload))
    by_form = post(
        client,
        api_key,
        content=form(sample(IOS, attribution=value, transaction_id="f")),
        headers=FORM,
    )
    if organic:
        for response in (by_query, by_form):
            assert response.status_code == 200
            assert response.json() == {"status": "ignored", "reason": "organic"}
        assert events(client, admin) == []
    else:
        accepted(by_query)
        accepted(by_form)
        assert [e["attributed"] for e in events(client, admin)] == [True, True]


def test_organic_network_is_ignored_even_when_flag_says_true(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    response = post(client, api_key, json=sample(ORGANIC, attribution="true"))
    assert response.status_code == 200
    assert response.json() == {"status": "ignored", "reason": "organic"}
    assert events(client, admin) == []


@pytest.mark.parametrize("value", ["maybe", "2", 2, -1, 0.5, ["true"], {"v": True}])
def test_unusable_attribution_flag_is_422(
    client: TestClient[Any], api_key: str, admin: dict[str, str], value: Any
) -> None:
    response = post(client, api_key, json=sample(IOS, attribution=value))
    assert response.status_code == 422
    body = response.json()
    assert body["field"] == "attribution"
    assert body["error"] == "invalid_payload"
    assert body["reason"].startswith("attribution:")
    assert events(client, admin) == []


# -- 8. times -----------------------------------------------------------------------------------

TIME_FORMATS: list[tuple[Any, datetime]] = [
    ("2024-05-01 12:04:41", T),
    ("2024-05-01T12:04:41Z", T),
    ("2024-05-01T14:04:41+02:00", T),
    ("2024-05-01 12:04:41.123", T_MS),
    ("2024-05-01T12:04:41+0000", T),
    ("2024-05-01T07:04:41-0500", T),
    (EPOCH_S, T),
    (str(EPOCH_S), T),
    (EPOCH_S * 1000, T),
    (str(EPOCH_S * 1000), T),
    (EPOCH_S * 1000 + 123, T_MS),
    (str(EPOCH_S * 1000 + 123), T_MS),
    (EPOCH_S + 0.123, T_MS),
]


@pytest.mark.parametrize(("value", "expected"), TIME_FORMATS)
def test_install_time_formats_in_json(
    client: TestClient[Any], api_key: str, admin: dict[str, str], value: Any, expected: datetime
) -> None:
    accepted(post(client, api_key, json=sample(IOS, install_time=value)))
    event = only_event(client, admin)
    assert when(event["install_time"]) == expected
    assert when(event["event_time"]) == expected
    assert event["raw"]["install_time"] == value


@pytest.mark.parametrize(("value", "expected"), TIME_FORMATS)
@pytest.mark.parametrize("transport", ["form", "query"])
def test_install_time_formats_in_form_and_query(
    client: TestClient[Any],
    api_key: str,
    admin: dict[str, str],
    value: Any,
    expected: datetime,
    transport: str,
) -> None:
    payload = sample(IOS, install_time=value)
    if transport == "form":
        accepted(post(client, api_key, content=form(payload), headers=FORM))
    else:
        accepted(get(client, api_key, urlencode(payload)))
    event = only_event(client, admin)
    assert when(event["install_time"]) == expected
    assert event["raw"]["install_time"] == str(value)


def test_click_time_with_offset_becomes_utc_touch_time(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    accepted(post(client, api_key, json=sample(IOS, click_time="2024-05-01T21:00:03+09:00")))
    assert when(only_event(client, admin)["touch_time"]) == datetime(
        2024, 5, 1, 12, 0, 3, tzinfo=UTC
    )


def test_stored_times_are_written_in_utc(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    accepted(post(client, api_key, json=sample(IOS, install_time="2024-05-01T14:04:41+02:00")))
    event = only_event(client, admin)
    assert event["install_time"] in ("2024-05-01T12:04:41Z", "2024-05-01T12:04:41+00:00")


@pytest.mark.parametrize(
    "value",
    [
        "yesterday",
        "2024-13-45",
        "2024-05-01 25:61:00",
        "01/05/2024 12:04",
        "1900-01-01 00:00:00",
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-01:00",
        -5,
        1e300,
        10**30,
        True,
        [EPOCH_S],
        {"s": EPOCH_S},
    ],
)
def test_unparseable_install_time_is_422_naming_the_field(
    client: TestClient[Any], api_key: str, admin: dict[str, str], value: Any
) -> None:
    response = post(client, api_key, json=sample(IOS, install_time=value))
    assert response.status_code == 422
    body = response.json()
    assert body["field"] == "install_time"
    assert body["status"] == "error"
    assert body["reason"].startswith("install_time:")
    assert events(client, admin) == []


def test_huge_integer_install_time_is_422_naming_the_field(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    # An integer far beyond a float (400 digits): refused for the field, not as a plugin crash.
    body = json.dumps(sample(IOS)).replace(
        '"install_time": "2024-05-01 12:04:41"', '"install_time": 1' + "0" * 400
    )
    assert "0" * 400 in body
    response = post(client, api_key, content=body.encode(), headers=JSON)
    assert response.status_code == 422
    assert response.json()["field"] == "install_time"
    assert events(client, admin) == []


# -- 9. UTF-8 of any script ---------------------------------------------------------------------

SCRIPTS = {
    "network_name": "شبكة إعلانية عربية",
    "campaign_name": "夏のセール 🎉 – Ünïcödé",
    "adgroup_name": "e\u0301cole – מבצע קיץ",  # a combining accent, and Hebrew
    "creative_name": "👩\u200d👩\u200d👧 🇯🇵 हिन्दी Ελληνικά",
    "site_id": "사이트_01",
    "kochava_device_id": "Кирилица-ID-1",
}


@pytest.mark.parametrize("transport", ["json", "form", "get", "post-query"])
def test_utf8_of_any_script_round_trips(
    client: TestClient[Any], api_key: str, admin: dict[str, str], transport: str
) -> None:
    payload = sample(IOS, **SCRIPTS)
    if transport == "json":
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        accepted(post(client, api_key, content=body, headers=JSON))
    elif transport == "form":
        accepted(post(client, api_key, content=form(payload), headers=FORM))
    elif transport == "get":
        accepted(get(client, api_key, urlencode(payload)))
    else:
        accepted(post(client, api_key, urlencode(payload, quote_via=quote)))
    event = only_event(client, admin)
    assert event["source"] == SCRIPTS["network_name"]
    assert event["campaign"] == SCRIPTS["campaign_name"]
    assert event["adgroup"] == SCRIPTS["adgroup_name"]
    assert event["ad"] == SCRIPTS["creative_name"]
    assert event["adgroup_id"] == "사이트_01"
    assert event["partner_device_id"] == "Кирилица-ID-1"
    assert "\u0301" in event["adgroup"]  # not normalised to the precomposed form
    for name, value in SCRIPTS.items():
        assert event["raw"][name] == value
    assert event["raw"] == payload


def test_unicode_sample_round_trips(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    accepted(post(client, api_key, content=kochava_samples()[UNICODE], headers=JSON))
    event = only_event(client, admin)
    assert event["source"] == "Réseau Démo"
    assert event["campaign"] == "夏のセール 🎉 – Ünïcödé"
    assert event["adgroup"] == "사이트_01"
    assert event["ad"] == "creatívé #1"
    assert event["raw"] == sample(UNICODE)


def test_json_unicode_escapes_are_decoded(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    body = json.dumps(sample(IOS, campaign_name="夏のセール 🎉"), ensure_ascii=True)
    assert "\\ud83c\\udf89" in body  # the emoji as a surrogate pair escape
    accepted(post(client, api_key, content=body.encode("ascii"), headers=JSON))
    assert only_event(client, admin)["campaign"] == "夏のセール 🎉"


# -- 10. zeroed and empty device ids --------------------------------------------------------------


def test_zeroed_idfa_sample_is_null(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    accepted(post(client, api_key, json=sample(ZEROED)))
    event = only_event(client, admin)
    assert event["idfa"] is None
    assert event["idfv"] == "5A5A5A5A-6B6B-4C7C-8D8D-9E9E9E9E9E95"
    assert event["partner_device_id"] == "KIFAKE00000000000000000000000000000000000005"
    assert event["raw"]["idfa"] == "00000000-0000-0000-0000-000000000000"


@pytest.mark.parametrize("transport", ["json", "form", "query"])
def test_empty_and_zeroed_ids_are_null_others_kept(
    client: TestClient[Any], api_key: str, admin: dict[str, str], transport: str
) -> None:
    payload = sample(
        IOS,
        idfa="00000000-0000-0000-0000-000000000000",
        adid="  ",
        android_id="0000000000000000",
        waid="{waid}",
        idfv=" 44444444-5555-4CCC-8DDD-666666666666 ",
    )
    if transport == "json":
        accepted(post(client, api_key, json=payload))
    elif transport == "form":
        accepted(post(client, api_key, content=form(payload), headers=FORM))
    else:
        accepted(get(client, api_key, urlencode(payload)))
    event = only_event(client, admin)
    assert event["idfa"] is None
    assert event["google_ad_id"] is None
    assert event["android_id"] is None
    assert event["windows_ad_id"] is None
    assert event["idfv"] == "44444444-5555-4CCC-8DDD-666666666666"
    assert event["partner_device_id"] == IOS_FIELDS["partner_device_id"]


def test_empty_idfa_is_null(client: TestClient[Any], api_key: str, admin: dict[str, str]) -> None:
    accepted(post(client, api_key, json=sample(IOS, idfa="", adid="  ")))
    event = only_event(client, admin)
    assert event["idfa"] is None
    assert event["google_ad_id"] is None
    assert event["idfv"] == IOS_FIELDS["idfv"]


def test_devices_with_null_ids_are_not_merged(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    first = sample(ZEROED, transaction_id=None, idfv="A1")
    second = sample(ZEROED, transaction_id=None, idfv="B2")
    accepted(post(client, api_key, json=first))
    accepted(post(client, api_key, json=second))
    stored = events(client, admin)
    assert sorted(e["idfv"] for e in stored) == ["A1", "B2"]
    assert all(e["idfa"] is None for e in stored)


# -- 11. retries --------------------------------------------------------------------------------


def test_retry_is_a_duplicate_wherever_the_key_is(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    payload = sample(IOS)
    first = post(client, api_key, json=payload)
    event_id = accepted(first)
    by_header = post(client, None, json=payload, headers={"X-Api-Key": api_key})
    assert by_header.status_code == 200
    assert by_header.json() == {"status": "duplicate", "event_id": event_id}
    by_bearer = post(client, None, json=payload, headers={"Authorization": f"Bearer {api_key}"})
    assert by_bearer.status_code == 200
    assert by_bearer.json() == {"status": "duplicate", "event_id": event_id}
    event = only_event(client, admin)
    assert event["event_id"] == event_id
    assert "api_key" not in event["raw"]
    assert event["raw"] == payload


@pytest.mark.parametrize("transport", ["json", "form", "query"])
def test_retry_without_transaction_id_is_a_duplicate_wherever_the_key_is(
    client: TestClient[Any], api_key: str, admin: dict[str, str], transport: str
) -> None:
    payload = without(sample(IOS), "transaction_id")
    if transport == "json":
        first = post(client, None, json=payload | {"api_key": api_key})
        again = post(client, None, json=payload, headers={"X-Api-Key": api_key})
    elif transport == "form":
        first = post(client, api_key, content=form(payload), headers=FORM)
        again = post(
            client,
            None,
            content=form(payload),
            headers=FORM | {"Authorization": f"Bearer {api_key}"},
        )
    else:
        first = get(client, api_key, urlencode(payload))
        again = get(client, None, urlencode(payload), headers={"X-Api-Key": api_key})
    event_id = accepted(first)
    assert again.status_code == 200
    assert again.json() == {"status": "duplicate", "event_id": event_id}
    event = only_event(client, admin)
    assert event["dedupe_key"].startswith("sha256:")
    assert "api_key" not in event["raw"]
    assert event["raw"] == payload


def test_retry_with_key_in_body_then_header_is_a_duplicate(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    payload = sample(IOS)
    event_id = accepted(post(client, None, json=payload | {"api_key": api_key}))
    again = post(client, None, json=payload, headers={"Authorization": f"Bearer {api_key}"})
    assert again.status_code == 200
    assert again.json() == {"status": "duplicate", "event_id": event_id}
    assert "api_key" not in only_event(client, admin)["raw"]


# -- 12. malformed input ------------------------------------------------------------------------

MALFORMED: list[tuple[str, bytes, str | None]] = [
    ("invalid json", b'{"event_name": _install}', "application/json"),
    ("invalid json, no content type", b'{"event_name": _install}', None),
    ("truncated json", b'{"event_name": "_install", "network_name": "N"', "application/json"),
    ("truncated json text/plain", b'{"event_name": "_install", "netw', "text/plain"),
    ("truncated array", b'[{"event_name": "_install"}, {"a"', None),
    ("trailing garbage", b'{"event_name": "_install"} {"x": 1}', "application/json"),
    ("json number", b"123", "application/json"),
    ("json string", b'"an install"', "application/json"),
    ("json true", b"true", "application/json"),
    ("json null", b"null", "application/json"),
    ("json number, no content type", b"42", None),
    ("json string, text/plain", b'"x"', "text/plain"),
    ("json number too large", b'{"install_time": 1e400}', "application/json"),
    ("integer too long", b'{"install_time": ' + b"9" * 5000 + b"}", "application/json"),
    ("invalid utf-8 in json", b'{"campaign_name": "\xff\xfe"}', "application/json"),
    ("invalid utf-8 in json string", b'{"campaign_name": "caf\xe9"}', None),
    (
        "invalid utf-8 in form body",
        b"campaign_name=caf\xe9&event_name=_install",
        FORM["Content-Type"],
    ),
    ("percent-encoded invalid utf-8 in form", b"campaign_name=caf%E9&x=1", FORM["Content-Type"]),
    ("deeply nested arrays", b"[" * 60000, "application/json"),
    ("deeply nested objects", b'{"a":' * 10000, "application/json"),
    ("deeply nested, closed", b"[" * 30000 + b"]" * 30000, None),
    ("plain text", b"hello partner", "text/plain"),
    ("form with json content type", b"event_name=_install", "application/json"),
    ("lone surrogate escape", b'{"campaign_name": "\\ud800"}', "application/json"),
]


@pytest.mark.parametrize(("name", "body", "content_type"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_body_is_400_with_a_reason(
    client: TestClient[Any],
    api_key: str,
    admin: dict[str, str],
    name: str,
    body: bytes,
    content_type: str | None,
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = post(client, api_key, content=body, headers=headers)
    assert response.status_code == 400, (name, response.text)
    answer = response.json()
    assert answer["status"] == "error"
    assert answer["error"] == "bad_request"
    assert len(answer["reason"]) > 5
    assert events(client, admin) == []


def test_100000_open_brackets_is_400_when_the_size_allows(
    tmp_path: Path, admin: dict[str, str]
) -> None:
    config = make_config(tmp_path / "data")
    config.limits.max_body_bytes = 256 * 1024
    key = new_key(config)
    with client_for(config) as client:
        for body in (b"[" * 100_000, b'{"a":' * 40_000, b"[" * 100_000 + b"]" * 100_000):
            response = post(client, key, content=body, headers=JSON)
            assert response.status_code == 400
            assert "nested" in response.json()["reason"] or "malformed" in response.json()["reason"]
        assert events(client, admin) == []


def test_100000_open_brackets_with_default_limit_is_refused_not_crashed(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    response = post(client, api_key, content=b"[" * 100_000, headers=JSON)
    assert response.status_code == 413  # over the 64 KiB default before it is even parsed
    assert events(client, admin) == []


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_percent_encoded_invalid_utf8_in_query_string_is_400(
    client: TestClient[Any], api_key: str, admin: dict[str, str], method: str
) -> None:
    payload = without(sample(IOS), "campaign_name")
    url = f"{URL}?api_key={api_key}&{urlencode(payload)}&campaign_name=caf%E9%FF"
    response = call(client, method, url)
    assert response.status_code == 400
    assert "UTF-8" in response.json()["reason"]
    assert events(client, admin) == []


def asgi(
    client: TestClient[Any],
    method: str,
    query_string: bytes,
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[int, dict[str, Any]]:
    """One request straight into the running app's ASGI callable, with a query string of raw
    bytes (which an HTTP client would percent-encode first)."""

    async def run() -> tuple[int, dict[str, Any]]:
        sent: list[dict[str, Any]] = []
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": URL,
            "raw_path": URL.encode(),
            "query_string": query_string,
            "root_path": "",
            "headers": [(b"host", b"testserver"), *(headers or [])],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
            "state": {},
        }
        await client.app(scope, receive, send)  # type: ignore[arg-type]
        start = next(m for m in sent if m["type"] == "http.response.start")
        content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return int(start["status"]), msgspec.json.decode(content)

    return client.blocking_portal.call(run)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_raw_invalid_utf8_bytes_in_query_string_is_400(
    client: TestClient[Any], api_key: str, admin: dict[str, str], method: str
) -> None:
    payload = without(sample(IOS), "campaign_name")
    good = f"api_key={api_key}&{urlencode(payload)}".encode()
    # The same request with valid raw UTF-8 is accepted: the helper does reach the postback.
    status, body = asgi(client, method, good + "&campaign_name=夏".encode())
    assert (status, body["status"]) == (202, "accepted")
    assert only_event(client, admin)["campaign"] == "夏"
    bad = sample(IOS, transaction_id="raw-bad")
    for raw in (b"&campaign_name=caf\xe9", b"&campaign_name=\xff\xfe", b"&\xc3=x"):
        query = f"api_key={api_key}&{urlencode(without(bad, 'campaign_name'))}".encode() + raw
        status, body = asgi(client, method, query)
        assert status == 400, body
        assert body["status"] == "error"
        assert "UTF-8" in body["reason"]
    assert len(events(client, admin)) == 1


def test_raw_invalid_utf8_in_query_over_http_is_refused_not_crashed(
    live_gateway: LiveGateway,
) -> None:
    import socket

    key = live_gateway.create_key()
    host, port = live_gateway.base_url.removeprefix("http://").split(":")
    request = (
        b"GET " + URL.encode() + b"?api_key=" + key.encode() + b"&campaign_name=caf\xe9"
        b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line = answer.split(b"\r\n", 1)[0]
    status = int(status_line.split()[1])
    assert 400 <= status < 500, answer


# -- 12b. bodies over the size limit ------------------------------------------------------------


def padded(total: int) -> bytes:
    """The iOS sample as JSON, padded to exactly ``total`` bytes."""
    base = json.dumps(sample(IOS, padding="")).encode()
    body = json.dumps(sample(IOS, padding="x" * (total - len(base)))).encode()
    assert len(body) == total
    return body


def oversized(limit: int) -> bytes:
    return padded(limit + 1)


def test_body_at_the_limit_is_accepted(
    client: TestClient[Any], api_key: str, admin: dict[str, str], config: Config
) -> None:
    limit = config.limits.max_body_bytes
    assert limit == 64 * 1024
    accepted(post(client, api_key, content=padded(limit), headers=JSON))
    event = only_event(client, admin)
    assert_ios(event)
    assert len(event["raw"]["padding"]) > 60_000


def test_body_over_the_limit_with_content_length_is_413(
    client: TestClient[Any], api_key: str, admin: dict[str, str], config: Config
) -> None:
    body = oversized(config.limits.max_body_bytes)
    assert len(body) == config.limits.max_body_bytes + 1
    request = client.build_request("POST", f"{URL}?api_key={api_key}", content=body, headers=JSON)
    assert request.headers["content-length"] == str(len(body))
    response = check(client.send(request))
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    assert str(config.limits.max_body_bytes) in response.json()["reason"]
    assert events(client, admin) == []


def chunks(body: bytes, size: int = 4096) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_body_over_the_limit_without_content_length_is_413(
    client: TestClient[Any], api_key: str, admin: dict[str, str], config: Config
) -> None:
    body = oversized(config.limits.max_body_bytes)
    request = client.build_request(
        "POST", f"{URL}?api_key={api_key}", content=chunks(body), headers=JSON
    )
    assert "content-length" not in request.headers
    assert request.headers["transfer-encoding"] == "chunked"
    response = check(client.send(request))
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    assert events(client, admin) == []
    # The same, chunked but within the limit, is accepted.
    small = json.dumps(sample(IOS)).encode()
    request = client.build_request(
        "POST", f"{URL}?api_key={api_key}", content=chunks(small, 100), headers=JSON
    )
    accepted(check(client.send(request)))
    assert_ios(only_event(client, admin))


def test_body_over_the_limit_is_413_over_real_http(live_gateway: LiveGateway) -> None:
    key = live_gateway.create_key()
    url = f"{live_gateway.base_url}{URL}?api_key={key}"
    body = oversized(64 * 1024)
    with httpx.Client(timeout=30) as http:
        with_length = http.post(url, content=body, headers=JSON)
        assert with_length.status_code == 413
        assert with_length.json()["status"] == "error"
        assert with_length.json()["reason"]
        chunked = http.post(url, content=chunks(body), headers=JSON)
        assert chunked.request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in chunked.request.headers
        assert chunked.status_code == 413
        assert chunked.json()["error"] == "payload_too_large"
        # A chunked body within the limit goes through.
        fine = http.post(url, content=chunks(json.dumps(sample(IOS)).encode(), 50), headers=JSON)
        assert fine.status_code == 202
        stored = http.get(
            f"{live_gateway.base_url}/events",
            headers={"Authorization": f"Bearer {live_gateway.env['GATEWAY_ADMIN_TOKEN']}"},
        ).json()["events"]
    assert [e["dedupe_key"] for e in stored] == ["fake-txn-0001"]


# -- 13. no input is ever answered with a 5xx ---------------------------------------------------


def catalogue(key: str) -> list[tuple[str, str, str, dict[str, str], bytes | Iterator[bytes]]]:
    """(name, method, query string, headers, body) of every input kind above."""
    k = f"api_key={key}"
    ios = sample(IOS)
    cases: list[tuple[str, str, str, dict[str, str], bytes | Iterator[bytes]]] = [
        ("json", "POST", k, JSON, json.dumps(ios).encode()),
        ("json android", "POST", k, JSON, kochava_samples()[ANDROID]),
        ("json purchase", "POST", k, JSON, kochava_samples()[PURCHASE]),
        ("json organic", "POST", k, JSON, kochava_samples()[ORGANIC]),
        ("json unicode", "POST", k, JSON, kochava_samples()[UNICODE]),
        ("json zeroed", "POST", k, JSON, kochava_samples()[ZEROED]),
        ("form", "POST", k, FORM, form(sample(IOS, transaction_id="c-form"))),
        ("query get", "GET", f"{k}&{urlencode(sample(IOS, transaction_id='c-get'))}", {}, b""),
        ("query post", "POST", f"{k}&{urlencode(sample(IOS, transaction_id='c-qp'))}", {}, b""),
        ("json text/plain", "POST", k, {"Content-Type": "text/plain"}, json.dumps(ios).encode()),
        (
            "json form type",
            "POST",
            k,
            FORM,
            json.dumps(sample(IOS, transaction_id="c-ft")).encode(),
        ),
        ("json no type", "POST", k, {}, json.dumps(sample(IOS, transaction_id="c-nt")).encode()),
        ("batch", "POST", k, JSON, json.dumps([sample(IOS), sample(ANDROID)]).encode()),
        ("batch mixed", "POST", k, JSON, json.dumps([sample(ORGANIC), sample(ZEROED)]).encode()),
        ("batch invalid", "POST", k, JSON, json.dumps([ios, {"install_time": "x"}]).encode()),
        ("batch empty", "POST", k, JSON, b"[]"),
        ("batch non-objects", "POST", k, JSON, b"[1, 2, 3]"),
        ("batch too big", "POST", k, JSON, json.dumps([{"a": i} for i in range(101)]).encode()),
        (
            "numbers",
            "POST",
            k,
            JSON,
            json.dumps(sample(IOS, site_id=8812, campaign_id=123, network_id=9999)).encode(),
        ),
        (
            "event_value text",
            "POST",
            k,
            JSON,
            json.dumps(sample(PURCHASE, event_value="4.99")).encode(),
        ),
        ("flag false", "POST", k, JSON, json.dumps(sample(IOS, attribution="FALSE")).encode()),
        ("flag yes", "POST", k, JSON, json.dumps(sample(IOS, attribution="yes")).encode()),
        ("flag maybe", "POST", k, JSON, json.dumps(sample(IOS, attribution="maybe")).encode()),
        ("flag list", "POST", k, JSON, json.dumps(sample(IOS, attribution=[1])).encode()),
        ("unicode form", "POST", k, FORM, form(sample(IOS, **SCRIPTS))),
        ("unicode get", "GET", f"{k}&{urlencode(sample(IOS, **SCRIPTS))}", {}, b""),
        ("ids", "POST", k, JSON, json.dumps(sample(IOS, idfa="", adid="  ")).encode()),
        ("retry header", "POST", "", {"X-Api-Key": key, **JSON}, json.dumps(ios).encode()),
        ("body key", "POST", "", JSON, json.dumps(ios | {"api_key": key}).encode()),
        ("form key", "POST", "", FORM, form(ios | {"api_key": key})),
        ("no key", "POST", "", JSON, json.dumps(ios).encode()),
        ("wrong key", "POST", "api_key=gwk_wrong", JSON, json.dumps(ios).encode()),
        (
            "mixed batch keys",
            "POST",
            "",
            JSON,
            json.dumps([ios | {"api_key": key}, ios | {"api_key": "x"}]).encode(),
        ),
        ("bad utf-8 query", "GET", f"{k}&campaign_name=%FF", {}, b""),
        ("oversized", "POST", k, JSON, oversized(64 * 1024)),
        ("oversized chunked", "POST", k, JSON, chunks(oversized(64 * 1024))),
        (
            "multipart",
            "POST",
            k,
            {"Content-Type": "multipart/form-data; boundary=x"},
            b"--x\r\n\r\n--x--",
        ),
        ("empty body json type", "POST", k, JSON, b""),
        ("whitespace body", "POST", k, JSON, b" \r\n "),
        (
            "identity_link not json",
            "GET",
            f"{k}&network_name=N&event_name=_install&identity_link=%7Bnope",
            {},
            b"",
        ),
        (
            "identity_link list",
            "POST",
            k,
            JSON,
            json.dumps(sample(ANDROID, identity_link=[1])).encode(),
        ),
        ("nul in text", "POST", k, JSON, json.dumps(sample(IOS, campaign_name="a\x00b")).encode()),
        (
            "text too long",
            "POST",
            k,
            JSON,
            json.dumps(sample(IOS, campaign_name="x" * 5000)).encode(),
        ),
        (
            "object where text",
            "POST",
            k,
            JSON,
            json.dumps(sample(IOS, campaign_name={"a": 1})).encode(),
        ),
        (
            "restricted network",
            "POST",
            k,
            JSON,
            json.dumps(sample(IOS, network_name="Facebook Ads", transaction_id="fb")).encode(),
        ),
        ("event without name", "POST", k, JSON, b'{"network_name": "N"}'),
        ("empty object", "POST", k, JSON, b"{}"),
        ("query only, nothing", "GET", k, {}, b""),
    ]
    cases += [
        (f"time {value!r}", "POST", k, JSON, json.dumps(sample(IOS, install_time=value)).encode())
        for value, _ in TIME_FORMATS
    ]
    cases += [
        (f"malformed {name}", "POST", k, {} if ctype is None else {"Content-Type": ctype}, body)
        for name, body, ctype in MALFORMED
    ]
    return cases


def test_no_input_is_ever_answered_with_a_5xx(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    seen: dict[int, list[str]] = {}
    for name, method, query, headers, body in catalogue(api_key):
        url = URL + (f"?{query}" if query else "")
        response = client.request(method, url, headers=headers, content=body)
        assert response.status_code < 500, (name, response.status_code, response.text)
        answer = response.json()
        assert answer["status"] in ("accepted", "duplicate", "ignored", "error"), name
        if response.status_code >= 400:
            assert answer["reason"], name
        seen.setdefault(response.status_code, []).append(name)
    # The catalogue exercises every kind of answer, not only one.
    assert {200, 202, 400, 401, 413, 415, 422} <= set(seen), seen
    # And everything stored is readable and in UTC.
    for event in events(client, admin):
        for name in ("install_time", "event_time", "received_at"):
            if event[name] is not None:
                when(event[name])


def test_batch_of_one_is_answered_as_a_batch(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    # A partner that batches reads per-item results whatever the batch size, and an invalid
    # item is named by its index.
    response = post(client, api_key, json=[sample(IOS)])
    assert response.status_code == 202
    body = response.json()
    assert (body["status"], body["accepted"]) == ("accepted", 1)
    assert [r["status"] for r in body["results"]] == ["accepted"]
    event = only_event(client, admin)
    assert event["event_id"] == body["results"][0]["event_id"]
    assert_ios(event)
    invalid = post(client, api_key, json=[sample(ANDROID, install_time="yesterday")])
    assert invalid.status_code == 422
    assert invalid.json()["field"] == "[0].install_time"
    # A single object is still answered as a single postback.
    single = post(client, api_key, json=sample(ANDROID))
    assert single.json() == {
        "status": "accepted",
        "event_id": single.json()["event_id"],
        "kind": "install",
    }


# -- white space around a form body; a plugin that crashes -------------------------------------


def test_a_form_body_ending_in_a_newline_is_the_same_postback(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    fields = {k: v for k, v in json.loads(kochava_samples()[IOS]).items() if k != "transaction_id"}
    body = urlencode(fields).encode()
    url = f"/partners/kochava/postback?api_key={api_key}"
    first = client.post(url, content=body + b"\n", headers=FORM)
    again = client.post(url, content=body, headers=FORM)
    assert (first.status_code, again.status_code) == (202, 200), again.text
    assert again.json() == {"status": "duplicate", "event_id": first.json()["event_id"]}
    [event] = events(client, admin)
    assert not any(str(v).endswith("\n") for v in event["raw"].values())


def test_a_plugin_that_crashes_answers_500_so_the_partner_retries(tmp_path: Path) -> None:
    from gateway import PartnerSpec
    from gateway.plugins import LoadedPartner

    def crash(payload: Any) -> Any:
        raise ZeroDivisionError("a plugin bug")

    config = make_config(tmp_path, crashy=True)
    crashy = LoadedPartner(spec=PartnerSpec(name="crashy", map=crash), source="t", version="0")
    key = new_key(config, "crashy")
    with TestClient(create_app(config, partners={"crashy": crashy})) as client:
        r = client.post(f"/partners/crashy/postback?api_key={key}", json={"a": 1})
        assert r.status_code == 500
        assert r.json()["error"] == "plugin_failure"
        assert "retry" in r.json()["reason"] and "ZeroDivisionError" not in r.text
        assert r.headers["retry-after"] == "30"
