"""TUNE end to end: every sample through HTTP into storage, the partner's retry form, its time
formats, flags and ids, and the conformance kit over the partner."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest
from litestar.testing import TestClient

from gateway import MappingError
from gateway.app import create_app
from gateway.conformance import CHECKS
from gateway.plugins import load_partners
from plugins.tune.mapping import map_postback
from tests.fixtures import make_config, new_key

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
URL = "/partners/tune/postback"


def query(name: str) -> str:
    return (SAMPLES / name).read_text(encoding="utf-8").strip()


def sample(name: str) -> dict[str, str]:
    return dict(parse_qsl(query(name), keep_blank_values=True))


def at(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


class Tune:
    """A gateway with TUNE enabled, a key for it, and helpers to send and read back."""

    def __init__(self, client: TestClient[Any], key: str, admin: dict[str, str]) -> None:
        self.client = client
        self.key = key
        self.admin = admin

    def send(self, fields: dict[str, str] | str) -> Any:
        qs = fields if isinstance(fields, str) else urlencode(fields)
        return self.client.get(f"{URL}?{qs}&{urlencode({'api_key': self.key})}")

    def events(self) -> list[dict[str, Any]]:
        r = self.client.get("/events?partner=tune&limit=100", headers=self.admin)
        assert r.status_code == 200, r.text
        events: list[dict[str, Any]] = r.json()["events"]
        return events


@pytest.fixture
def tune(tmp_path: Path, admin: dict[str, str]) -> Iterator[Tune]:
    config = make_config(tmp_path / "data", tune=True)
    key = new_key(config, "tune")
    with TestClient(create_app(config)) as client:
        yield Tune(client, key, admin)


def utc(value: str | None) -> datetime | None:
    if value is None:
        return None
    moment = datetime.fromisoformat(value)
    assert moment.utcoffset() == timedelta(0), value
    return moment


# -- every sample through HTTP ----------------------------------------------------------------

# file → what the stored event must hold (the shared samples' README, and the mapping table).
EXPECTED: dict[str, dict[str, Any]] = {
    "install_attributed.query": {
        "kind": "install",
        "event_name": "install",
        "source": "fake_network",
        "source_id": "99999",
        "campaign": "FAKE_spring",
        "adgroup": "FAKE_group_A",
        "ad": "FAKE_banner_red",
        "platform": "android",
        "google_ad_id": "00000000-0000-4000-8000-0000000000a1",
        "idfa": None,
        "idfv": None,
        "braze_id": "fake-braze-device-0001",
        "external_id": None,
        "revenue": None,
        "currency": None,
        "event_time": at(2030, 1, 2, 3, 5, 6),
        "install_time": at(2030, 1, 2, 3, 5, 6),
        "touch_time": None,
    },
    "event_purchase.query": {
        "kind": "event",
        "event_name": "purchase",
        "source": "fake_network",
        "source_id": None,
        "campaign": "FAKE_spring",
        "adgroup": None,
        "ad": None,
        "platform": "android",
        "google_ad_id": "00000000-0000-4000-8000-0000000000a1",
        "idfa": None,
        "braze_id": "fake-braze-device-0001",
        "revenue": 4.99,
        "currency": "USD",
        "event_time": datetime(2030, 1, 5, 8, 11, 12, 131000, tzinfo=UTC),
        "install_time": None,
    },
    "event_reengagement_open_ios.query": {
        "kind": "reengagement",
        "event_name": "open",
        "source": "Fake Retargeting DSP",
        "source_id": "88888",
        "campaign": "FAKE_winback",
        "adgroup": "FAKE_lapsed_30d",
        "ad": "FAKE_banner_blue",
        "platform": "ios",
        "app_id": "com.fakeco.fakeapp",
        "idfa": "00000000-0000-4000-8000-0000000000a3",
        "idfv": "00000000-0000-4000-8000-0000000000b3",
        "google_ad_id": None,
        "braze_id": "fake-braze-device-0003",
        "country": "ZZ",
        "event_time": at(2030, 1, 6, 9, 30),
        "touch_time": at(2030, 1, 6, 9, 10),
        "install_time": None,
    },
}
TIME_FIELDS = ("event_time", "install_time", "touch_time", "received_at")


def test_every_sample_has_an_expected_outcome() -> None:
    assert {p.name for p in SAMPLES.iterdir()} == {*EXPECTED, "install_organic.query"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_is_accepted_and_mapped(tune: Tune, name: str) -> None:
    r = tune.send(query(name))
    assert (r.status_code, r.json()["status"]) == (202, "accepted"), r.text
    [event] = tune.events()
    assert event["event_id"] == r.json()["event_id"]
    assert (event["partner"], event["attributed"]) == ("tune", True)
    for field, want in EXPECTED[name].items():
        got = utc(event[field]) if field in TIME_FIELDS else event[field]
        assert got == want, field
    assert utc(event["received_at"]) is not None
    assert event["raw"] == sample(name)


def test_organic_install_is_ignored_and_not_stored(tune: Tune) -> None:
    r = tune.send(query("install_organic.query"))
    assert r.status_code == 200
    assert r.json() == {"status": "ignored", "reason": "organic"}
    assert tune.events() == []


def test_organic_sample_maps_its_ids() -> None:
    event = map_postback(sample("install_organic.query"))
    assert event.attributed is False
    assert event.idfa is None  # all zeros
    assert event.idfv == "00000000-0000-4000-8000-0000000000b2"
    assert event.event_time == at(2030, 1, 2, 4, 0, 0)


def test_get_only() -> None:
    [partner] = load_partners(builtins=("plugins.tune",), allow=()).values()
    assert partner.spec.methods == ("GET",)


def test_post_is_refused(tune: Tune) -> None:
    r = tune.client.post(f"{URL}?api_key={tune.key}", content=query("install_attributed.query"))
    assert r.status_code == 405
    assert tune.events() == []


# -- retries ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["install_attributed.query", "event_purchase.query"])
def test_retry_with_incremented_retry_attempts_is_a_duplicate(tune: Tune, name: str) -> None:
    fields = sample(name)
    first = tune.send(fields)
    assert (first.status_code, first.json()["status"]) == (202, "accepted"), first.text
    for attempt in range(int(fields["retry_attempts"]) + 1, 4):
        again = tune.send({**fields, "retry_attempts": str(attempt)})
        assert again.status_code == 200, again.text
        assert again.json() == {"status": "duplicate", "event_id": first.json()["event_id"]}
    [event] = tune.events()
    assert event["event_id"] == first.json()["event_id"]


def test_retry_with_a_new_send_time_is_a_duplicate(tune: Tune) -> None:
    fields = {**sample("install_attributed.query"), "datetime": "2030-01-02 03:06:00"}
    first = tune.send({**fields, "timestamp": "1893553560"})
    retry = tune.send(
        {
            **fields,
            "retry_attempts": "1",
            "datetime": "2030-01-02 03:21:00",
            "timestamp": "1893554460",
        }
    )
    assert retry.status_code == 200
    assert retry.json() == {"status": "duplicate", "event_id": first.json()["event_id"]}
    assert len(tune.events()) == 1


def test_a_second_purchase_is_not_a_duplicate(tune: Tune) -> None:
    fields = sample("event_purchase.query")
    first = tune.send(fields)
    later = tune.send({**fields, "conversion_timestamp_milliseconds": "1893831999000"})
    assert (first.status_code, later.status_code) == (202, 202)
    assert later.json()["event_id"] != first.json()["event_id"]
    assert len(tune.events()) == 2


def test_dedupe_key_ignores_only_retry_varying_fields() -> None:
    fields = sample("event_purchase.query")
    key = map_postback(fields).dedupe_key
    assert map_postback({**fields, "retry_attempts": "7", "revenue_usd": "5.01"}).dedupe_key == key
    assert map_postback({**fields, "revenue": "5.99"}).dedupe_key != key
    assert map_postback({**fields, "user_id": "fake-braze-device-0009"}).dedupe_key != key


# -- time formats -----------------------------------------------------------------------------

BASE = {"event_name": "purchase", "advertiser_sub_publisher": "fake_network"}


@pytest.mark.parametrize(
    ("field", "value", "want"),
    [
        ("conversion_datetime", "2030-01-02 03:05:06", at(2030, 1, 2, 3, 5, 6)),
        ("conversion_timestamp", "1893553506", at(2030, 1, 2, 3, 5, 6)),
        (
            "conversion_timestamp_milliseconds",
            "1893831072131",
            datetime(2030, 1, 5, 8, 11, 12, 131000, tzinfo=UTC),
        ),
    ],
)
def test_conversion_time_format(field: str, value: str, want: datetime) -> None:
    event = map_postback({**BASE, field: value})
    assert event.event_time == want
    assert event.event_time is not None and event.event_time.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("field", "value", "want"),
    [
        ("conversion_datetime", "2030-01-02 03:05:06", "2030-01-02T03:05:06+00:00"),
        ("conversion_timestamp", "1893553506", "2030-01-02T03:05:06+00:00"),
        ("conversion_timestamp_milliseconds", "1893553506789", "2030-01-02T03:05:06.789000+00:00"),
    ],
)
def test_time_format_through_http(tune: Tune, field: str, value: str, want: str) -> None:
    fields = {**sample("install_attributed.query"), field: value}
    for other in ("conversion_datetime", "conversion_timestamp"):
        if other != field:
            del fields[other]
    r = tune.send(fields)
    assert r.status_code == 202, r.text
    [event] = tune.events()
    assert utc(event["event_time"]) == datetime.fromisoformat(want)
    assert utc(event["install_time"]) == datetime.fromisoformat(want)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("session_datetime", "2030-01-02 02:59:00"),
        ("session_timestamp", "1893553140"),
        ("session_timestamp_milliseconds", "1893553140000"),
        ("impression_datetime", "2030-01-02 02:59:00"),
        ("impression_timestamp", "1893553140"),
        ("impression_timestamp_milliseconds", "1893553140000"),
    ],
)
def test_touch_time_formats(field: str, value: str) -> None:
    assert map_postback({**BASE, field: value}).touch_time == at(2030, 1, 2, 2, 59, 0)


def test_click_time_wins_over_impression_time() -> None:
    payload = {
        **BASE,
        "session_datetime": "2030-01-02 02:59:00",
        "impression_datetime": "2030-01-02 02:00:00",
    }
    assert map_postback(payload).touch_time == at(2030, 1, 2, 2, 59, 0)


def test_milliseconds_win_over_seconds_and_datetime() -> None:
    payload = {
        **BASE,
        "conversion_datetime": "2030-01-02 03:05:06",
        "conversion_timestamp": "1893553506",
        "conversion_timestamp_milliseconds": "1893553506500",
    }
    assert map_postback(payload).event_time == datetime(2030, 1, 2, 3, 5, 6, 500000, tzinfo=UTC)


def test_no_conversion_time_leaves_event_time_empty() -> None:
    event = map_postback(BASE)
    assert (event.event_time, event.install_time) == (None, None)


# -- flags ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("1", "reengagement"),
        ("0", "event"),
        ("true", "reengagement"),
        ("FALSE", "event"),
        ("Yes", "reengagement"),
        ("no", "event"),
        (" 1 ", "reengagement"),
        ("", "event"),
    ],
)
def test_is_reengagement_flag(value: str, kind: str) -> None:
    event = map_postback({**BASE, "event_name": "open", "is_reengagement": value})
    assert (event.kind, event.event_name) == (kind, "open")


def test_is_reengagement_through_http(tune: Tune) -> None:
    fields = {**sample("event_purchase.query"), "is_reengagement": "1"}
    r = tune.send(fields)
    assert (r.status_code, r.json()["kind"]) == (202, "reengagement")
    [event] = tune.events()
    assert (event["kind"], event["event_name"], event["revenue"]) == (
        "reengagement",
        "purchase",
        4.99,
    )


# -- kinds ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event_name", "reengagement", "kind", "name"),
    [
        ("install", "0", "install", "install"),
        ("Install", "0", "install", "install"),
        ("install", "1", "install", "install"),
        ("reinstall", "0", "reinstall", "reinstall"),
        ("open", "1", "reengagement", "open"),
        ("purchase", "0", "event", "purchase"),
        ("Level Complete", "0", "event", "Level Complete"),
    ],
)
def test_kinds(event_name: str, reengagement: str, kind: str, name: str) -> None:
    event = map_postback({**BASE, "event_name": event_name, "is_reengagement": reengagement})
    assert (event.kind, event.event_name) == (kind, name)


def test_install_time_only_for_installs() -> None:
    install = map_postback({**BASE, "event_name": "install", "conversion_timestamp": "1893553506"})
    purchase = map_postback({**BASE, "conversion_timestamp": "1893553506"})
    assert install.install_time == at(2030, 1, 2, 3, 5, 6)
    assert purchase.install_time is None


# -- organic rule -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"advertiser_sub_publisher": "", "publisher_id": ""},
        {"advertiser_sub_publisher": "", "publisher_id": "0"},
        {"advertiser_sub_publisher": "0", "publisher_id": "0"},
        {"advertiser_sub_publisher": " ", "publisher_id": "000"},
        {"advertiser_sub_publisher": None, "publisher_id": None},
        {"advertiser_sub_publisher": "{advertiser_sub_publisher}", "publisher_id": "0"},
    ],
)
def test_organic_when_publisher_and_sub_publisher_are_empty_or_zero(
    changes: dict[str, Any],
) -> None:
    payload = {k: v for k, v in {**sample("install_attributed.query"), **changes}.items() if v}
    event = map_postback(payload)
    assert event.attributed is False
    assert (event.source, event.source_id) == (None, None)


def test_sub_publisher_alone_is_attributed() -> None:
    payload = {**sample("install_attributed.query"), "publisher_id": "0"}
    event = map_postback(payload)
    assert (event.attributed, event.source, event.source_id) == (True, "fake_network", None)


def test_publisher_alone_is_attributed_and_named_by_publisher_name() -> None:
    payload = {
        **sample("install_attributed.query"),
        "advertiser_sub_publisher": "",
        "publisher_name": "Fake Network Inc",
    }
    event = map_postback(payload)
    assert (event.attributed, event.source, event.source_id) == (True, "Fake Network Inc", "99999")


def test_organic_variant_through_http_is_not_stored(tune: Tune) -> None:
    fields = {**sample("install_attributed.query"), "advertiser_sub_publisher": "0"}
    fields["publisher_id"] = "0"
    r = tune.send(fields)
    assert (r.status_code, r.json()) == (200, {"status": "ignored", "reason": "organic"})
    assert tune.events() == []


# -- ids --------------------------------------------------------------------------------------


def test_zeroed_and_empty_ids_become_null(tune: Tune) -> None:
    fields = {
        **sample("install_attributed.query"),
        "google_aid": "00000000-0000-0000-0000-000000000000",
        "ios_ifa": "00000000-0000-0000-0000-000000000000",
        "ios_ifv": "",
        "android_id": "  ",
        "user_id": "",
    }
    r = tune.send(fields)
    assert r.status_code == 202, r.text
    [event] = tune.events()
    for field in ("google_ad_id", "idfa", "idfv", "android_id", "braze_id"):
        assert event[field] is None, field


@pytest.mark.parametrize("value", ["", "0", "00000000-0000-0000-0000-000000000000", "{user_id}"])
def test_braze_id_from_user_id_null_when_unset(value: str) -> None:
    assert map_postback({**BASE, "user_id": value}).braze_id is None


def test_braze_id_is_user_id_stripped() -> None:
    event = map_postback({**BASE, "user_id": "  fake-braze-device-0042 "})
    assert (event.braze_id, event.external_id) == ("fake-braze-device-0042", None)


def test_campaign_falls_back_to_tune_campaign() -> None:
    payload = {**BASE, "campaign_name": "FAKE Spring (TUNE)", "campaign_id": "4242"}
    event = map_postback(payload)
    assert (event.campaign, event.campaign_id) == ("FAKE Spring (TUNE)", "4242")


# -- revenue ----------------------------------------------------------------------------------


def test_revenue_falls_back_to_amount_then_revenue_usd() -> None:
    amount = map_postback({**BASE, "amount": "1.50", "currency_code": "eur"})
    assert (amount.revenue, amount.currency) == (Decimal("1.50"), "eur")
    usd = map_postback({**BASE, "revenue_usd": "5.40", "currency_code": "EUR"})
    assert (usd.revenue, usd.currency) == (Decimal("5.40"), "USD")


# -- unusable values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("conversion_datetime", "2030-13-45 25:61:61"),
        ("conversion_timestamp", "yesterday"),
        ("conversion_timestamp_milliseconds", "1e400"),
        ("session_datetime", "02/01/2030"),
        ("is_reengagement", "maybe"),
        ("revenue", "4,99"),
        ("advertiser_sub_campaign", "x" * 5000),
    ],
)
def test_unusable_value_is_422_naming_the_field(tune: Tune, field: str, value: str) -> None:
    r = tune.send({**sample("event_purchase.query"), field: value})
    assert r.status_code == 422, r.text
    assert r.json()["status"] == "error"
    assert r.json()["field"] == field
    assert tune.events() == []


def test_bad_time_is_refused_even_when_another_form_is_good() -> None:
    with pytest.raises(MappingError) as err:
        map_postback({**BASE, "conversion_datetime": "soon", "conversion_timestamp": "1893553506"})
    assert err.value.field == "conversion_datetime"


def test_missing_event_name_is_422(tune: Tune) -> None:
    fields = sample("install_attributed.query")
    del fields["event_name"]
    r = tune.send(fields)
    assert (r.status_code, r.json()["field"]) == (422, "event_name")


# -- the conformance kit ----------------------------------------------------------------------


@pytest.mark.parametrize("promise", sorted(CHECKS))
def test_conformance(promise: str) -> None:
    [partner] = load_partners(builtins=("plugins.tune",), allow=()).values()
    CHECKS[promise](partner)
