"""The admin API: bearer-token guard, /healthz, and GET /events (limits, partner filter, order,
and the common event's JSON as DESIGN.md §4 defines it)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from litestar.testing import TestClient

from tests.fixtures import ADMIN_TOKEN, IOS_FIELDS, kochava_samples

SAMPLES = kochava_samples()
POSTBACK = "/partners/kochava/postback"
ADMIN_PATHS = ("/partners", "/partners/kochava/status", "/events", "/events?partner=kochava")

#: DESIGN.md §4, every field of the common attribution event.
EVENT_FIELDS = {
    "event_id",
    "partner",
    "kind",
    "event_name",
    "attributed",
    "source",
    "campaign",
    "adgroup",
    "ad",
    "source_id",
    "campaign_id",
    "adgroup_id",
    "ad_id",
    "event_time",
    "install_time",
    "touch_time",
    "received_at",
    "platform",
    "app_id",
    "idfa",
    "idfv",
    "google_ad_id",
    "android_id",
    "windows_ad_id",
    "braze_id",
    "external_id",
    "partner_device_id",
    "revenue",
    "currency",
    "country",
    "dedupe_key",
    "raw",
}
TEXT_OR_NULL = EVENT_FIELDS - {
    "attributed",
    "event_time",
    "install_time",
    "touch_time",
    "received_at",
    "revenue",
    "raw",
}
UTC_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$")


def install(n: int) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(SAMPLES["install_ios_attributed.json"])
    payload["transaction_id"] = f"fake-txn-admin-{n:03d}"
    return payload


def events(client: TestClient[Any], admin: dict[str, str], **params: Any) -> list[dict[str, Any]]:
    response = client.get("/events", params=params, headers=admin)
    assert response.status_code == 200, response.text
    out: list[dict[str, Any]] = response.json()["events"]
    return out


def assert_error(response: Any, status_code: int, error: str) -> dict[str, Any]:
    assert response.status_code == status_code, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["status"] == "error"
    assert body["error"] == error
    assert isinstance(body["reason"], str) and body["reason"].strip()
    return body


# -- the guard ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ADMIN_PATHS)
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong-token",
        f"Bearer {ADMIN_TOKEN}x",
        f"Bearer {ADMIN_TOKEN[:-1]}",
        f"Basic {ADMIN_TOKEN}",
        f"Token {ADMIN_TOKEN}",
        ADMIN_TOKEN,
    ],
    ids=[
        "missing",
        "empty",
        "bearer-no-token",
        "bearer-blank",
        "wrong",
        "longer",
        "shorter",
        "basic",
        "token-scheme",
        "no-scheme",
    ],
)
def test_admin_endpoints_refuse_without_the_token(
    client: TestClient[Any], path: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    assert_error(client.get(path, headers=headers), 401, "unauthorized")


def test_admin_token_is_accepted_in_any_case_of_the_scheme(
    client: TestClient[Any], admin: dict[str, str]
) -> None:
    for scheme in ("Bearer", "bearer", "BEARER"):
        response = client.get("/partners", headers={"Authorization": f"{scheme} {ADMIN_TOKEN}"})
        assert response.status_code == 200, response.text
    assert client.get("/partners", headers=admin).status_code == 200


def test_admin_token_elsewhere_or_partner_key_is_refused(
    client: TestClient[Any], api_key: str
) -> None:
    for headers, params in (
        ({"X-Api-Key": ADMIN_TOKEN}, {}),
        ({}, {"token": ADMIN_TOKEN}),
        ({}, {"api_key": ADMIN_TOKEN}),
        ({"Authorization": f"Bearer {api_key}"}, {}),
    ):
        assert_error(client.get("/events", headers=headers, params=params), 401, "unauthorized")


def test_unknown_partner_status_is_404_but_only_for_the_admin(
    client: TestClient[Any], admin: dict[str, str]
) -> None:
    assert_error(client.get("/partners/nope/status", headers=admin), 404, "not_found")
    assert_error(client.get("/partners/nope/status"), 401, "unauthorized")


def test_healthz_is_open(client: TestClient[Any]) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        response = client.get("/healthz", headers=headers)
        assert response.status_code == 200, response.text
        assert response.json() == {"status": "ok"}


def test_healthz_head_has_the_get_headers_and_no_body(client: TestClient[Any]) -> None:
    got, probed = client.get("/healthz"), client.head("/healthz")
    assert probed.status_code == 200 and probed.content == b""
    assert (
        probed.headers["content-length"] == got.headers["content-length"] == str(len(got.content))
    )
    assert probed.headers["content-type"] == got.headers["content-type"] == "application/json"


# -- GET /events -------------------------------------------------------------------------------


def test_events_limit(client: TestClient[Any], admin: dict[str, str], api_key: str) -> None:
    for part in (range(0, 30), range(30, 55)):  # two batches: 50 is the batch limit
        batch = [install(n) for n in part]
        response = client.post(POSTBACK, params={"api_key": api_key}, json=batch)
        assert response.status_code == 202, response.text
        assert response.json()["accepted"] == len(part)

    default = events(client, admin)
    assert len(default) == 50
    # Newest first: the batch was stored in order, so the last item comes first.
    assert [e["dedupe_key"] for e in default] == [
        f"fake-txn-admin-{n:03d}" for n in range(54, 4, -1)
    ]
    assert events(client, admin, limit="") == default
    assert len(events(client, admin, limit=55)) == 55
    assert len(events(client, admin, limit=1000)) == 55
    assert [e["dedupe_key"] for e in events(client, admin, limit=1)] == ["fake-txn-admin-054"]
    assert events(client, admin, limit=3, partner="kochava") == default[:3]


@pytest.mark.parametrize(
    "limit", ["0", "abc", "100000", "1001", "-1", "1.5", "1e3", " 5", "0x10", "²", "٣"]
)
def test_events_bad_limit_is_400(
    client: TestClient[Any], admin: dict[str, str], limit: str
) -> None:
    body = assert_error(
        client.get("/events", params={"limit": limit}, headers=admin), 400, "bad_request"
    )
    assert "limit" in body["reason"]


def test_events_unknown_partner_is_404(client: TestClient[Any], admin: dict[str, str]) -> None:
    body = assert_error(
        client.get("/events", params={"partner": "nope"}, headers=admin), 404, "not_found"
    )
    assert "nope" in body["reason"]


def test_events_newest_first(client: TestClient[Any], admin: dict[str, str], api_key: str) -> None:
    assert events(client, admin) == []
    ids = []
    for n in (3, 1, 2):  # stored order, not the transaction ids' order
        response = client.post(POSTBACK, params={"api_key": api_key}, json=install(n))
        assert response.status_code == 202, response.text
        ids.append(response.json()["event_id"])
    listed = events(client, admin, partner="kochava")
    assert [e["event_id"] for e in listed] == ids[::-1]
    assert [e["dedupe_key"] for e in listed] == [
        "fake-txn-admin-002",
        "fake-txn-admin-001",
        "fake-txn-admin-003",
    ]
    received = [datetime.fromisoformat(e["received_at"]) for e in listed]
    assert received == sorted(received, reverse=True)


def assert_event_shape(event: dict[str, Any]) -> None:
    assert set(event) == EVENT_FIELDS
    assert re.fullmatch(r"[0-9a-f]{32}", event["event_id"])
    assert event["partner"] == "kochava"
    assert event["kind"] in ("install", "reinstall", "reengagement", "event")
    assert isinstance(event["attributed"], bool)
    for name in TEXT_OR_NULL:
        assert event[name] is None or isinstance(event[name], str), name
    for name in ("event_time", "install_time", "touch_time", "received_at"):
        value = event[name]
        if value is not None:
            assert UTC_TIME.match(value), (name, value)
            parsed = datetime.fromisoformat(value)
            assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0
    assert event["received_at"] is not None
    assert event["revenue"] is None or (
        isinstance(event["revenue"], int | float) and not isinstance(event["revenue"], bool)
    )
    assert isinstance(event["raw"], dict)
    assert "api_key" not in event["raw"]
    assert event["dedupe_key"]


def test_event_json_has_every_field_with_its_type(
    client: TestClient[Any], admin: dict[str, str], api_key: str
) -> None:
    before = datetime.now(UTC)
    purchase = json.loads(SAMPLES["event_reengagement_purchase.json"])
    sent = client.post(POSTBACK, json={**purchase, "api_key": api_key})
    assert sent.status_code == 202, sent.text
    installed = client.post(
        POSTBACK, params={"api_key": api_key}, content=SAMPLES["install_ios_attributed.json"]
    )
    assert installed.status_code == 202, installed.text
    after = datetime.now(UTC)

    response = client.get("/events", headers=admin)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert '"revenue":4.99' in response.text  # a JSON number, not a string
    install_event, purchase_event = response.json()["events"]
    for event in (install_event, purchase_event):
        assert_event_shape(event)
        assert before <= datetime.fromisoformat(event["received_at"]) <= after

    assert purchase_event["event_id"] == sent.json()["event_id"]
    assert {k: v for k, v in purchase_event.items() if k not in ("event_id", "received_at")} == {
        "partner": "kochava",
        "kind": "reengagement",
        "event_name": "purchase",
        "attributed": True,
        "source": "Example Retargeting DSP",
        "campaign": "winback_may",
        "adgroup": None,
        "ad": "carousel_3",
        "source_id": None,
        "campaign_id": None,
        "adgroup_id": None,
        "ad_id": "carousel_3",
        "event_time": "2024-05-20T21:00:00Z",
        "install_time": None,
        "touch_time": None,
        "platform": "android",
        "app_id": None,
        "idfa": None,
        "idfv": None,
        "google_ad_id": "12121212-3434-4565-8787-909090909090",
        "android_id": None,
        "windows_ad_id": None,
        "braze_id": "fake-braze-device-0000-0000-000000000004",
        "external_id": None,
        "partner_device_id": "KAFAKE00000000000000000000000000000000000004",
        "revenue": 4.99,
        "currency": "USD",
        "country": None,
        "dedupe_key": "fake-txn-0004",
        "raw": purchase,  # the key sent in the body is not kept
    }

    assert install_event["event_id"] == installed.json()["event_id"]
    assert {k: v for k, v in install_event.items() if k not in ("event_id", "received_at")} == {
        **IOS_FIELDS,
        "event_time": "2024-05-01T12:04:41Z",
        "install_time": "2024-05-01T12:04:41Z",
        "touch_time": "2024-05-01T12:00:03Z",
        "raw": json.loads(SAMPLES["install_ios_attributed.json"]),
    }
