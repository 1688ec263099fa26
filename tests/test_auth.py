"""Partner keys on the real app: every place a key may be sent, and every way a request is
refused (DESIGN.md §1 steps 1 and 2). A refused request never stores anything."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from litestar.testing import TestClient

from gateway import AttributionEvent, PartnerSpec
from gateway.app import create_app
from gateway.config import Config
from gateway.keys import hash_key, key_secret
from gateway.normalise import text, timestamp
from gateway.plugins import LoadedPartner, load_partners
from gateway.storage import open_storage
from tests.fixtures import kochava_samples, make_config, new_key

URL = "/partners/kochava/postback"
ACME_URL = "/partners/acme/postback"
JSON = {"Content-Type": "application/json"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def sample(name: str = "install_ios_attributed.json", **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(kochava_samples()[name])
    data.update(changes)
    return data


def check(response: httpx.Response) -> httpx.Response:
    assert response.status_code < 500, response.text
    body = response.json()
    if response.status_code >= 400:
        assert body["status"] == "error"
        assert body["reason"].strip()
    return response


def events(
    client: TestClient[Any], admin: dict[str, str], partner: str | None = None
) -> list[dict[str, Any]]:
    params = {"limit": "1000"} | ({"partner": partner} if partner else {})
    response = client.get("/events", headers=admin, params=params)
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["events"]
    return found


def assert_stored_ios(client: TestClient[Any], admin: dict[str, str], event_id: str) -> None:
    (event,) = events(client, admin)
    assert event["event_id"] == event_id
    assert event["partner"] == "kochava"
    assert event["source"] == "FakeNetwork Ads"
    assert event["campaign"] == "spring_launch_us"
    assert event["idfa"] == "11111111-2222-4AAA-8BBB-333333333333"
    assert event["dedupe_key"] == "fake-txn-0001"
    assert "api_key" not in event["raw"]
    assert event["raw"] == sample()


def assert_401(response: httpx.Response, says: str) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    assert body["status"] == "error"
    assert body["error"] == "unauthorized"
    assert says in body["reason"], body["reason"]


def revoke(config: Config, partner: str, key: str) -> None:
    """Revoke the partner's ``key`` through the real storage layer."""

    async def run() -> None:
        storage = open_storage(config.storage.url)
        await storage.open()
        try:
            pairs = await storage.active_key_hashes(partner)
            (key_id,) = [
                kid for kid, stored in pairs if stored == hash_key(key, key_secret(config))
            ]
            assert await storage.revoke_key(key_id, datetime.now(UTC))
        finally:
            await storage.close()

    asyncio.run(run())


# -- where the key may be -----------------------------------------------------------------------


def test_key_in_query(client: TestClient[Any], api_key: str, admin: dict[str, str]) -> None:
    response = check(client.post(f"{URL}?api_key={api_key}", json=sample()))
    assert response.status_code == 202
    assert_stored_ios(client, admin, response.json()["event_id"])


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_key_in_authorization_bearer(
    client: TestClient[Any], api_key: str, admin: dict[str, str], scheme: str
) -> None:
    headers = {"Authorization": f"{scheme} {api_key}"}
    response = check(client.post(URL, json=sample(), headers=headers))
    assert response.status_code == 202
    assert_stored_ios(client, admin, response.json()["event_id"])


def test_key_in_x_api_key(client: TestClient[Any], api_key: str, admin: dict[str, str]) -> None:
    response = check(client.post(URL, json=sample(), headers={"X-Api-Key": f" {api_key} "}))
    assert response.status_code == 202
    assert_stored_ios(client, admin, response.json()["event_id"])


def test_key_in_json_body_is_removed_from_raw(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    response = check(client.post(URL, json=sample(api_key=api_key)))
    assert response.status_code == 202
    assert_stored_ios(client, admin, response.json()["event_id"])


def test_key_in_form_body_is_removed_from_raw(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    body = urlencode(sample(api_key=api_key)).encode()
    response = check(client.post(URL, content=body, headers=FORM))
    assert response.status_code == 202
    assert_stored_ios(client, admin, response.json()["event_id"])


def test_key_in_every_batch_item_is_removed_from_raw(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    items = [
        sample(api_key=api_key),
        sample("install_android_identity_link.json", api_key=api_key),
    ]
    response = check(client.post(URL, json=items))
    assert response.status_code == 202
    assert response.json()["accepted"] == 2
    stored = events(client, admin)
    assert len(stored) == 2
    assert all("api_key" not in e["raw"] for e in stored)
    assert {e["dedupe_key"] for e in stored} == {"fake-txn-0001", "fake-txn-0002"}


def test_key_in_query_of_a_get_is_removed_from_raw(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    response = check(client.get(f"{URL}?{urlencode(sample())}&api_key={api_key}"))
    assert response.status_code == 202
    assert_stored_ios(client, admin, response.json()["event_id"])


def test_several_active_keys_all_work(
    client: TestClient[Any], api_key: str, admin: dict[str, str], config: Config
) -> None:
    second = new_key(config)
    assert second != api_key
    first = check(client.post(URL, json=sample(), headers={"X-Api-Key": api_key}))
    assert first.status_code == 202
    other = check(
        client.post(URL, json=sample(transaction_id="t-2"), headers={"X-Api-Key": second})
    )
    assert other.status_code == 202
    assert len(events(client, admin)) == 2


# -- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"json": sample()},
        {"content": urlencode(sample()).encode(), "headers": FORM},
        {"content": b""},
        {"json": sample(api_key=None)},
        {"json": sample(), "headers": {"Authorization": "Bearer "}},
        {"json": sample(), "headers": {"Authorization": "Basic dXNlcjpwYXNz"}},
    ],
    ids=[
        "json",
        "form",
        "empty",
        "null field",
        "empty bearer",
        "basic",
    ],
)
def test_missing_key_is_401(
    client: TestClient[Any], api_key: str, admin: dict[str, str], kwargs: dict[str, Any]
) -> None:
    response = check(client.post(URL, **kwargs))
    assert_401(response, "missing API key")
    assert "api_key" in response.json()["reason"]
    assert events(client, admin) == []


def test_missing_key_on_get_is_401(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    assert_401(check(client.get(f"{URL}?{urlencode(sample())}")), "missing API key")
    assert events(client, admin) == []


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"params": {"api_key": "  "}, "json": sample()}, "the api_key parameter is empty"),
        ({"headers": {"X-Api-Key": " "}, "json": sample()}, "the X-Api-Key header is empty"),
        ({"json": {**sample(), "api_key": "  "}}, "the api_key field is empty"),
        ({"json": {**sample(), "api_key": ["k"]}}, "the api_key field must be a string"),
        ({"json": {**sample(), "api_key": 12345}}, "the api_key field must be a string"),
    ],
    ids=["blank parameter", "blank header", "blank field", "list field", "number field"],
)
def test_a_key_sent_blank_or_of_the_wrong_type_is_401_saying_so(
    client: TestClient[Any], admin: dict[str, str], kwargs: dict[str, Any], says: str
) -> None:
    assert_401(check(client.post(URL, **kwargs)), says)
    assert events(client, admin) == []


def test_a_blank_api_key_parameter_beside_a_good_one_is_ignored(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    response = check(client.get(f"{URL}?api_key=&api_key={api_key}&{urlencode(sample())}"))
    assert response.status_code == 202, response.text


def test_two_different_api_key_parameters_are_401(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    response = check(client.get(f"{URL}?api_key=wrong&api_key={api_key}&{urlencode(sample())}"))
    assert_401(response, "several different api_key values")
    assert events(client, admin) == []


@pytest.mark.parametrize(
    ("first", "second"),
    [("query", "header"), ("header", "query"), ("bearer", "header"), ("bearer", "query")],
)
def test_different_keys_in_two_places_are_401_whichever_is_right(
    client: TestClient[Any], api_key: str, admin: dict[str, str], first: str, second: str
) -> None:
    """No place wins over another: a good key beside a different one is refused, both ways."""

    def send(places: dict[str, str]) -> Any:
        headers = {}
        if "header" in places:
            headers["X-Api-Key"] = places["header"]
        if "bearer" in places:
            headers["Authorization"] = f"Bearer {places['bearer']}"
        url = f"{URL}?api_key={places['query']}" if "query" in places else URL
        return check(client.post(url, json=sample(), headers=headers))

    for keys in ({first: api_key, second: "gwk_other"}, {first: "gwk_other", second: api_key}):
        response = send(keys)
        assert_401(response, "different keys sent in")
        assert "gwk_other" not in response.text and api_key not in response.text
    assert events(client, admin) == []
    assert send({first: api_key, second: api_key}).status_code == 202  # the same key: fine


@pytest.mark.parametrize("where", ["header", "query"])
def test_a_different_key_in_the_body_beside_a_header_or_parameter_is_401(
    client: TestClient[Any], api_key: str, admin: dict[str, str], config: Config, where: str
) -> None:
    other = new_key(config)  # valid too: still not to be mixed
    headers = {"X-Api-Key": api_key} if where == "header" else {}
    url = f"{URL}?api_key={api_key}" if where == "query" else URL
    for body_key in (other, "gwk_wrong"):
        response = check(client.post(url, json=sample(api_key=body_key), headers=headers))
        assert_401(response, "different keys sent in the api_key field")
    batch = [sample(api_key=api_key), sample("install_android_identity_link.json")]
    batch[1]["api_key"] = other
    assert_401(check(client.post(url, json=batch, headers=headers)), "different keys")
    assert events(client, admin) == []
    same = check(client.post(url, json=sample(api_key=api_key), headers=headers))
    assert same.status_code == 202, same.text
    assert "api_key" not in events(client, admin)[0]["raw"]


def test_bearer_separated_by_a_tab_and_a_padded_query_key_work(
    client: TestClient[Any], api_key: str
) -> None:
    tab = client.post(URL, json=sample(), headers={"Authorization": f"Bearer\t{api_key}"})
    assert tab.status_code == 202, tab.text
    padded = client.get(f"{URL}?api_key=%20{api_key}%20&{urlencode(sample())}")
    assert padded.status_code == 200 and padded.json()["status"] == "duplicate"


@pytest.mark.parametrize("where", ["query", "bearer", "header", "json", "form"])
def test_wrong_key_is_401(
    client: TestClient[Any], api_key: str, admin: dict[str, str], where: str
) -> None:
    wrong = api_key[:-1] + ("A" if api_key[-1] != "A" else "B")
    payload = sample()
    if where == "query":
        response = client.post(f"{URL}?api_key={wrong}", json=payload)
    elif where == "bearer":
        response = client.post(URL, json=payload, headers={"Authorization": f"Bearer {wrong}"})
    elif where == "header":
        response = client.post(URL, json=payload, headers={"X-Api-Key": wrong})
    elif where == "json":
        response = client.post(URL, json=payload | {"api_key": wrong})
    else:
        body = urlencode(payload | {"api_key": wrong}).encode()
        response = client.post(URL, content=body, headers=FORM)
    assert_401(check(response), "invalid API key for partner 'kochava'")
    assert wrong not in response.text  # the key is not echoed back
    assert events(client, admin) == []


def test_wrong_key_is_checked_before_the_body_is_read(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    response = check(client.post(f"{URL}?api_key=gwk_nope", content=b"{not json", headers=JSON))
    assert_401(response, "invalid API key")
    # With the right key the same body is a 400.
    response = check(client.post(f"{URL}?api_key={api_key}", content=b"{not json", headers=JSON))
    assert response.status_code == 400
    assert events(client, admin) == []


def test_revoked_key_is_401_and_the_other_key_still_works(
    client: TestClient[Any], api_key: str, admin: dict[str, str], config: Config
) -> None:
    spare = new_key(config)
    first = check(client.post(URL, json=sample(), headers={"X-Api-Key": api_key}))
    assert first.status_code == 202
    revoke(config, "kochava", api_key)
    payload = sample(transaction_id="after-revoke")
    for response in (
        client.post(URL, json=payload, headers={"X-Api-Key": api_key}),
        client.post(f"{URL}?api_key={api_key}", json=payload),
        client.post(URL, json=payload | {"api_key": api_key}),
    ):
        assert_401(check(response), "invalid API key")
    assert [e["dedupe_key"] for e in events(client, admin)] == ["fake-txn-0001"]
    spare_answer = check(client.post(URL, json=payload, headers={"X-Api-Key": spare}))
    assert spare_answer.status_code == 202
    assert len(events(client, admin)) == 2


def test_batch_items_with_different_keys_are_401(
    client: TestClient[Any], api_key: str, admin: dict[str, str], config: Config
) -> None:
    other = new_key(config)  # both keys are valid: they still may not be mixed
    items = [
        sample(api_key=api_key),
        sample("install_android_identity_link.json", api_key=other),
    ]
    response = check(client.post(URL, json=items))
    assert_401(response, "every item of a batch must carry the same api_key")
    items[1]["api_key"] = "gwk_wrong"
    assert_401(
        check(client.post(URL, json=items)), "every item of a batch must carry the same api_key"
    )
    assert events(client, admin) == []


def test_401_never_stores_and_then_the_right_key_is_not_a_duplicate(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    payload = sample()
    for _ in range(3):
        assert_401(check(client.post(f"{URL}?api_key=gwk_wrong", json=payload)), "invalid")
        assert_401(check(client.post(URL, json=payload)), "missing")
    assert events(client, admin) == []
    first = check(client.post(f"{URL}?api_key={api_key}", json=payload))
    assert first.status_code == 202
    assert first.json()["status"] == "accepted"


# -- partners: unknown, disabled, another partner's key -----------------------------------------


def test_unknown_partner_is_404(
    client: TestClient[Any], api_key: str, admin: dict[str, str]
) -> None:
    for method in ("GET", "POST"):
        response = check(
            client.request(method, f"/partners/nosuch/postback?api_key={api_key}", json=sample())
        )
        assert response.status_code == 404
        assert response.json()["error"] == "not_found"
        assert "nosuch" in response.json()["reason"]
    assert check(client.post("/partners/nosuch/postback", json=sample())).status_code == 404
    assert events(client, admin) == []


def test_disabled_partner_is_403(tmp_path: Path, admin: dict[str, str]) -> None:
    config = make_config(tmp_path / "data", kochava=False)
    key = new_key(config)
    with TestClient(create_app(config)) as client:
        for response in (
            client.post(f"{URL}?api_key={key}", json=sample()),
            client.get(f"{URL}?api_key={key}&{urlencode(sample())}"),
            client.post(URL, json=sample()),  # no key: still 403, the partner comes first
        ):
            check(response)
            assert response.status_code == 403
            assert response.json()["error"] == "forbidden"
            assert "disabled" in response.json()["reason"]
        assert events(client, admin) == []


def acme_map(payload: Mapping[str, Any]) -> AttributionEvent:
    """A tiny second partner: a click id, a network and an install time."""
    return AttributionEvent(
        kind="install",
        attributed=True,
        source=text(payload.get("network"), "network"),
        install_time=timestamp(payload.get("installed_at"), "installed_at"),
        dedupe_key=text(payload.get("click_id"), "click_id") or "",
    )


@pytest.fixture
def two_partners(tmp_path: Path) -> Iterator[tuple[Config, TestClient[Any]]]:
    config = make_config(tmp_path / "data", kochava=True, acme=True)
    acme = LoadedPartner(
        spec=PartnerSpec(name="acme", map=acme_map, display_name="Acme"),
        source="tests",
        version="0",
    )
    partners = load_partners(allow=()) | {"acme": acme}
    assert {"kochava", "acme"} <= set(partners)
    with TestClient(create_app(config, partners=partners)) as client:
        yield config, client


def test_key_of_another_partner_is_401(
    two_partners: tuple[Config, TestClient[Any]], admin: dict[str, str]
) -> None:
    config, client = two_partners
    acme_key = new_key(config, "acme")
    kochava_key = new_key(config, "kochava")
    acme_payload = {"click_id": "c-1", "network": "Acme Ads", "installed_at": "2024-05-01 12:04:41"}

    for response in (
        client.post(f"{URL}?api_key={acme_key}", json=sample()),
        client.post(URL, json=sample(), headers={"Authorization": f"Bearer {acme_key}"}),
        client.post(URL, json=sample(api_key=acme_key)),
    ):
        assert_401(check(response), "invalid API key for partner 'kochava'")
    response = check(client.post(f"{ACME_URL}?api_key={kochava_key}", json=acme_payload))
    assert_401(response, "invalid API key for partner 'acme'")
    assert events(client, admin) == []

    # Each key works for its own partner.
    acme_ok = check(client.post(ACME_URL, json=acme_payload, headers={"X-Api-Key": acme_key}))
    assert acme_ok.status_code == 202
    kochava_ok = check(client.post(URL, json=sample(), headers={"X-Api-Key": kochava_key}))
    assert kochava_ok.status_code == 202
    (acme_event,) = events(client, admin, "acme")
    assert acme_event["event_id"] == acme_ok.json()["event_id"]
    assert acme_event["partner"] == "acme"
    assert acme_event["source"] == "Acme Ads"
    assert acme_event["dedupe_key"] == "c-1"
    assert acme_event["install_time"] in ("2024-05-01T12:04:41Z", "2024-05-01T12:04:41+00:00")
    (kochava_event,) = events(client, admin, "kochava")
    assert kochava_event["event_id"] == kochava_ok.json()["event_id"]


def test_revoking_one_partners_key_leaves_the_other_partner_alone(
    two_partners: tuple[Config, TestClient[Any]], admin: dict[str, str]
) -> None:
    config, client = two_partners
    acme_key = new_key(config, "acme")
    kochava_key = new_key(config, "kochava")
    revoke(config, "acme", acme_key)
    payload = {"click_id": "c-2", "network": "Acme Ads"}
    response = check(client.post(ACME_URL, json=payload, headers={"X-Api-Key": acme_key}))
    assert_401(response, "invalid API key for partner 'acme'")
    response = check(client.post(URL, json=sample(), headers={"X-Api-Key": kochava_key}))
    assert response.status_code == 202
    assert [e["partner"] for e in events(client, admin)] == ["kochava"]
