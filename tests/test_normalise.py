"""Unit tests of the core normalisation helpers (DESIGN.md §5): times, flags, ids, text, numbers,
picking fields, dedupe keys and the rules ``finalise`` applies to every mapped event."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from gateway.errors import MappingError
from gateway.events import AttributionEvent
from gateway.normalise import (
    as_utc,
    device_id,
    finalise,
    flag,
    json_object,
    number,
    pick,
    pick_named,
    stable_key,
    text,
    timestamp,
)

T = datetime(2024, 5, 1, 12, 4, 41, tzinfo=UTC)
T_MS = datetime(2024, 5, 1, 12, 4, 41, 123000, tzinfo=UTC)
EPOCH_S = 1714565081  # 2024-05-01T12:04:41Z


def assert_mapping_error(fn: Any, value: Any, field: str = "the_field") -> MappingError:
    with pytest.raises(MappingError) as info:
        fn(value, field)
    err = info.value
    assert err.field == field
    assert err.status_code == 422
    assert err.reason.startswith(f"{field}: ")
    assert err.body()["field"] == field
    return err


# -- timestamp ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-05-01 12:04:41", T),
        ("2024-05-01T12:04:41", T),
        ("2024-05-01T12:04:41Z", T),
        ("2024-05-01T12:04:41+00:00", T),
        ("2024-05-01T14:04:41+02:00", T),
        ("2024-05-01T07:34:41-04:30", T),
        ("2024-05-01T12:04:41+0000", T),
        ("2024-05-01T14:04:41+0200", T),
        ("2024-05-01 12:04:41.123", T_MS),
        ("2024-05-01T12:04:41.123Z", T_MS),
        ("2024-05-01 14:04:41.123+02:00", T_MS),
        ("  2024-05-01 12:04:41  ", T),
        (EPOCH_S, T),
        (str(EPOCH_S), T),
        (float(EPOCH_S), T),
        (EPOCH_S + 0.123, T_MS),
        (f"{EPOCH_S}.123", T_MS),
        (EPOCH_S * 1000, T),
        (str(EPOCH_S * 1000), T),
        (EPOCH_S * 1000 + 123, T_MS),
        (str(EPOCH_S * 1000 + 123), T_MS),
        (EPOCH_S * 1_000_000 + 123_000, T_MS),
        (str(EPOCH_S * 1_000_000 + 123_000), T_MS),
    ],
)
def test_timestamp_formats_all_become_the_same_utc_moment(value: Any, expected: datetime) -> None:
    got = timestamp(value, "install_time")
    assert got == expected
    assert got is not None
    assert got.utcoffset() == timedelta(0)
    assert got.tzinfo is UTC


def test_timestamp_naive_is_taken_as_utc_and_aware_is_converted() -> None:
    naive = timestamp("2024-05-01 12:04:41", "t")
    assert naive is not None and naive.tzinfo is UTC
    assert (naive.hour, naive.minute) == (12, 4)
    tokyo = timestamp("2024-05-01T21:04:41+09:00", "t")
    assert tokyo is not None and tokyo.tzinfo is UTC
    assert (tokyo.hour, tokyo.minute, tokyo.day) == (12, 4, 1)
    # Crossing midnight backwards with a negative offset.
    assert timestamp("2024-04-30T23:04:41-13:00", "t") == T


def test_as_utc() -> None:
    assert as_utc(datetime(2024, 5, 1, 12, 4, 41)) == T
    assert as_utc(datetime(2024, 5, 1, 12, 4, 41)).tzinfo is UTC
    plus2 = datetime(2024, 5, 1, 14, 4, 41, tzinfo=timezone(timedelta(hours=2)))
    assert as_utc(plus2) == T
    assert as_utc(plus2).utcoffset() == timedelta(0)
    assert as_utc(plus2).hour == 12


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (946_684_800, datetime(2000, 1, 1, tzinfo=UTC)),
        (946_684_800_000, datetime(2000, 1, 1, tzinfo=UTC)),
        (946_684_800_000_000, datetime(2000, 1, 1, tzinfo=UTC)),
        ("946684800", datetime(2000, 1, 1, tzinfo=UTC)),
        ("946684800000", datetime(2000, 1, 1, tzinfo=UTC)),
        ("946684800000000", datetime(2000, 1, 1, tzinfo=UTC)),
        (1_000_000_000_000, datetime(2001, 9, 9, 1, 46, 40, tzinfo=UTC)),  # ms
        (1_000_000_000_000_000, datetime(2001, 9, 9, 1, 46, 40, tzinfo=UTC)),  # µs
    ],
)
def test_timestamp_epoch_unit_chosen_by_magnitude(value: Any, expected: datetime) -> None:
    assert timestamp(value, "t") == expected


@pytest.mark.parametrize(
    "value",
    [
        99_999_999_999,  # seconds (below 1e11): the year 5138
        100_000_000_000,  # milliseconds (1e11 and up): 1973
        99_999_999_999_999,  # milliseconds: the year 5138
        100_000_000_000_000,  # microseconds (1e14 and up): 1973
    ],
)
def test_timestamp_epoch_unit_thresholds_out_of_range(value: int) -> None:
    err = assert_mapping_error(timestamp, value)
    assert "out of range" in err.reason


@pytest.mark.parametrize(
    "value", [None, "", "   ", "{install_time}", "{{install_time}}", "[install_time]", "%TIME%"]
)
def test_timestamp_blank_and_unfilled_macros_are_none(value: Any) -> None:
    assert timestamp(value, "t") is None


@pytest.mark.parametrize(
    "value",
    [
        "yesterday",
        "2024-13-45",
        "2024-02-30 10:00:00",
        "2024-05-01 25:00:00",
        "01/05/2024",
        "nan",
        "NaN",
        "inf",
        "-inf",
        "1e400",
        float("nan"),
        float("inf"),
        float("-inf"),
        True,
        False,
        [EPOCH_S],
        {"seconds": EPOCH_S},
        # Out-of-range years and epochs: a unit or data error, never a crash.
        "1900-01-01 00:00:00",
        "0001-01-01 00:00:00",
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-01:00",
        "2300-01-01T00:00:00Z",
        -1,
        "-1714565081",
        1e300,
        10**30,
        pytest.param(10**400, id="10**400"),
    ],
)
def test_timestamp_unusable_values_raise_a_mapping_error_naming_the_field(value: Any) -> None:
    assert_mapping_error(timestamp, value, "install_time")


def test_timestamp_out_of_range_message() -> None:
    err = assert_mapping_error(timestamp, "1900-01-01 00:00:00", "click_time")
    assert "out of range" in err.reason
    err = assert_mapping_error(timestamp, "yesterday", "click_time")
    assert "'yesterday'" in err.reason


def test_timestamp_range_limits() -> None:
    assert timestamp("1990-01-01T00:00:00Z", "t") == datetime(1990, 1, 1, tzinfo=UTC)
    assert_mapping_error(timestamp, "1989-12-31T23:59:59Z")
    assert timestamp("2199-12-31T23:59:59Z", "t") == datetime(2199, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert_mapping_error(timestamp, "2200-01-01T00:00:00Z")


# -- flag ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [True, 1, 1.0, "true", "TRUE", "True", " true ", "1", "yes", "YES", "Yes", "y", "t", "on"],
)
def test_flag_true(value: Any) -> None:
    assert flag(value, "attribution") is True


@pytest.mark.parametrize(
    "value",
    [False, 0, 0.0, "false", "FALSE", "False", " false\n", "0", "no", "NO", "n", "f", "off"],
)
def test_flag_false(value: Any) -> None:
    assert flag(value, "attribution") is False


@pytest.mark.parametrize("value", [None, "", "   "])
def test_flag_blank_is_none(value: Any) -> None:
    assert flag(value, "attribution") is None


@pytest.mark.parametrize(
    "value", ["maybe", "2", "tru", "nope", 2, -1, 0.5, float("nan"), [], [True], {}, {"a": 1}]
)
def test_flag_unusable_raises_naming_the_field(value: Any) -> None:
    err = assert_mapping_error(flag, value, "attribution")
    assert "flag" in err.reason


# -- device_id ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        "\t\n",
        "00000000-0000-0000-0000-000000000000",
        " 00000000-0000-0000-0000-000000000000 ",
        "00000000000000000000000000000000",
        "0000000000000000",
        "0",
        0,
        "null",
        "NULL",
        "None",
        "nil",
        "undefined",
        "(null)",
        "unknown",
        "N/A",
        "{idfa}",
        "{{idfa}}",
        "[idfa]",
        "%IDFA%",
        "{$idfa}",
    ],
)
def test_device_id_null_values(value: Any) -> None:
    assert device_id(value, "idfa") is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("11111111-2222-4AAA-8BBB-333333333333", "11111111-2222-4AAA-8BBB-333333333333"),
        ("  11111111-2222-4AAA-8BBB-333333333333\n", "11111111-2222-4AAA-8BBB-333333333333"),
        ("00000000-0000-0000-0000-000000000001", "00000000-0000-0000-0000-000000000001"),
        (9999, "9999"),
        (123.0, "123"),
        ("fakeandroid00002", "fakeandroid00002"),
        ("사이트_01", "사이트_01"),
    ],
)
def test_device_id_kept(value: Any, expected: str) -> None:
    assert device_id(value, "idfa") == expected


@pytest.mark.parametrize("value", [["a"], {"id": "a"}, float("nan"), float("inf")])
def test_device_id_unusable_raises_naming_the_field(value: Any) -> None:
    assert_mapping_error(device_id, value, "adid")


# -- text ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "夏のセール 🎉 – Ünïcödé",
        "حملة الصيف",
        "מבצע קיץ",
        "हिन्दी अभियान",
        "e\u0301cole",  # decomposed: must not be normalised to NFC
        "\u00e9cole",  # precomposed
        "👩\u200d👩\u200d👧 🇯🇵",
        "Réseau Démo",
        "사이트_01",
        "a+b%20c",  # no decoding here: percent-decoding happens once, at the edge
    ],
)
def test_text_keeps_utf8_exactly(value: str) -> None:
    got = text(value, "campaign_name")
    assert got == value
    assert got is not None and got.encode("utf-8") == value.encode("utf-8")


def test_text_does_not_unify_composed_and_decomposed_forms() -> None:
    assert text("e\u0301", "f") != text("\u00e9", "f")
    assert text("e\u0301", "f") == "e\u0301"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("  spring  ", "spring"),
        (8812, "8812"),
        (-3, "-3"),
        (123.0, "123"),
        (4.5, "4.5"),
        (Decimal("4.99"), "4.99"),
        (True, "true"),
        (False, "false"),
        (10**30, "1" + "0" * 30),
    ],
)
def test_text_converts_numbers_and_strips(value: Any, expected: str) -> None:
    assert text(value, "f") == expected


@pytest.mark.parametrize("value", [None, "", "  ", "{campaign}", "{{campaign_name}}"])
def test_text_blank_and_macros_are_none(value: Any) -> None:
    assert text(value, "campaign_name") is None


@pytest.mark.parametrize("value", ["[Brand] Spring", "[campaign]", "%PROMO%", "{a} and {b}"])
def test_text_keeps_brackets_that_may_be_real_names(value: str) -> None:
    assert text(value, "campaign_name") == value


@pytest.mark.parametrize("value", ["[idfa]", "%IDFA%", "{idfa}"])
def test_device_id_treats_macros_in_any_bracket_style_as_none(value: str) -> None:
    assert device_id(value, "idfa") is None


@pytest.mark.parametrize("value", [0, 0.0, "0", " 0 ", "0.0"])
def test_timestamp_epoch_zero_means_no_time(value: Any) -> None:
    assert timestamp(value, "click_time") is None


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (["a", "b"], "a list"),
        (("a",), "a list"),
        ({"a": 1}, "an object"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        (float("-inf"), "finite"),
        ("x" * 4097, "longer than"),
        ("bad\x00value", "NUL"),
    ],
)
def test_text_unusable_raises_naming_the_field(value: Any, says: str) -> None:
    err = assert_mapping_error(text, value, "campaign_name")
    assert says in err.reason


def test_text_length_limit_is_inclusive() -> None:
    assert text("x" * 4096, "f") == "x" * 4096


# -- number -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("4.99", Decimal("4.99")),
        (" 4.99 ", Decimal("4.99")),
        (4.99, Decimal("4.99")),
        (5, Decimal(5)),
        ("0", Decimal(0)),
        ("-1.5", Decimal("-1.5")),
        ("+2", Decimal(2)),
        (".5", Decimal("0.5")),
        ("1e2", Decimal(100)),
        (Decimal("0.01"), Decimal("0.01")),
    ],
)
def test_number(value: Any, expected: Decimal) -> None:
    got = number(value, "revenue")
    assert got == expected
    assert isinstance(got, Decimal)


def test_number_keeps_decimal_precision_of_float_text() -> None:
    # 4.99 as a float is not exactly 4.99; the decimal must be.
    assert number(4.99, "revenue") == Decimal("4.99")
    assert str(number(0.1, "revenue")) == "0.1"


@pytest.mark.parametrize("value", [None, "", "   "])
def test_number_blank_is_none(value: Any) -> None:
    assert number(value, "revenue") is None


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        "abc",
        "1,99",
        "4.99 USD",
        "$5",
        "NaN",
        "nan",
        "inf",
        "Infinity",
        float("nan"),
        float("inf"),
        Decimal("NaN"),
        1e16,
        "1e400",
        pytest.param(10**400, id="10**400"),
        [1],
        {"v": 1},
    ],
)
def test_number_unusable_raises_naming_the_field(value: Any) -> None:
    assert_mapping_error(number, value, "revenue")


# -- pick ---------------------------------------------------------------------------------------


def test_pick_first_non_blank() -> None:
    payload = {"a": None, "b": "", "c": "  ", "d": "x", "e": "y"}
    assert pick(payload, "a", "b", "c", "d", "e") == "x"
    assert pick(payload, "missing", "e") == "y"
    assert pick(payload, "a", "b", "c") is None
    assert pick(payload, "missing") is None
    assert pick({}, "a") is None


def test_pick_returns_falsy_values_that_are_not_blank() -> None:
    assert pick({"n": 0, "m": "x"}, "n", "m") == 0
    assert pick({"b": False, "m": "x"}, "b", "m") is False
    assert pick({"l": [], "m": "x"}, "l", "m") == []


def test_pick_dotted_paths() -> None:
    payload = {"identity_link": {"braze_id": "b-1", "empty": ""}, "flat": "f"}
    assert pick(payload, "identity_link.braze_id") == "b-1"
    assert pick(payload, "identity_link.empty", "identity_link.missing", "flat") == "f"
    assert pick(payload, "flat.inner") is None  # through a string: not an object
    assert pick(payload, "identity_link.braze_id.deeper") is None
    assert pick({"a.b": "literal"}, "a.b") == "literal"  # a flat key with a dot, as sent


@pytest.mark.parametrize("macro", ["{campaign}", "{{campaign}}", " {campaign_name} ", "{$x.y~z-1}"])
def test_pick_skips_unfilled_macros_for_the_fallback(macro: str) -> None:
    assert pick({"name": macro, "id": "c-1"}, "name", "id") == "c-1"
    assert pick({"name": macro}, "name") is None
    assert pick({"o": {"name": macro}, "id": "c-1"}, "o.name", "id") == "c-1"


@pytest.mark.parametrize("value", ["[idfa]", "%IDFA%", "{two words}", "x{y}", "{", "{}"])
def test_pick_keeps_what_is_not_an_unfilled_macro(value: str) -> None:
    assert pick({"name": value, "id": "c-1"}, "name", "id") == value


def test_pick_named_returns_the_path_the_value_came_from() -> None:
    payload = {"name": None, "alias": " ", "macro": "{id}", "id": ["x"], "o": {"p": 0}}
    assert pick_named(payload, "name", "alias", "macro", "id") == (["x"], "id")
    assert pick_named(payload, "missing", "o.p", "id") == (0, "o.p")
    assert pick_named(payload, "name", "alias", "macro") == (None, "name")
    assert pick_named({}, "a.b", "c") == (None, "a.b")


def test_pick_named_names_the_fallback_in_an_error() -> None:
    payload = {"campaign_name": "{campaign_name}", "campaign_id": ["c"]}
    with pytest.raises(MappingError) as err:
        text(*pick_named(payload, "campaign_name", "campaign_id"))
    assert err.value.field == "campaign_id"


def test_pick_named_loose_compares_keys_without_case_underscores_or_hyphens() -> None:
    obj = {"brazeId": "a", "Braze-User-ID": "b", "blank": " "}
    assert pick_named(obj, "braze_id", loose=True) == ("a", "brazeId")
    assert pick_named(obj, "BRAZE_USER_ID", loose=True) == ("b", "Braze-User-ID")
    assert pick_named(obj, "blank", "missing", loose=True) == (None, "blank")
    assert pick_named(obj, "braze_id") == (None, "braze_id")  # exact keys by default


def test_pick_named_loose_takes_the_first_present_key_in_name_order() -> None:
    obj = {"braze_id": " ", "BrazeId": "{braze_id}", "BRAZE-ID": "c", "appboy_id": "d"}
    assert pick_named(obj, "braze_id", "appboy_id", loose=True) == ("c", "BRAZE-ID")
    assert pick_named(obj, "appboy_id", "braze_id", loose=True) == ("d", "appboy_id")
    assert pick_named({1: "x", "1": "y"}, "1", loose=True) == ("y", "1")  # text keys only


def test_pick_named_loose_at_every_level_of_a_dotted_path() -> None:
    payload = {"Identity-Link": {"BrazeID": "b-1"}, "identityLink": {"user_id": "u-1"}}
    assert pick_named(payload, "identity_link.braze_id", loose=True) == (
        "b-1",
        "Identity-Link.BrazeID",
    )
    # Every key that matches is looked in, in the payload's order.
    assert pick_named(payload, "identity_link.user_id", loose=True) == (
        "u-1",
        "identityLink.user_id",
    )
    assert pick_named(payload, "identity_link.braze_id") == (None, "identity_link.braze_id")


# -- stable_key ---------------------------------------------------------------------------------


def test_stable_key_shape_and_order_independence() -> None:
    a = stable_key({"x": "1", "y": "夏", "z": [1, 2]})
    b = stable_key({"z": [1, 2], "y": "夏", "x": "1"})
    assert a == b
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", a)


def test_stable_key_changes_with_any_value() -> None:
    base = {"idfa": "A", "install_time": "2024-05-01 12:04:41"}
    assert stable_key(base) != stable_key({**base, "idfa": "B"})
    assert stable_key(base) != stable_key({**base, "extra": ""})
    # Types matter: a number and its text are different payloads.
    assert stable_key({"site_id": 8812}) != stable_key({"site_id": "8812"})


def test_stable_key_ignores_named_fields() -> None:
    first = {"idfa": "A", "retry": "1", "sent_at": "t1"}
    retry = {"idfa": "A", "retry": "2", "sent_at": "t2"}
    assert stable_key(first) != stable_key(retry)
    assert stable_key(first, ignore=("retry", "sent_at")) == stable_key(
        retry, ignore=["sent_at", "retry"]
    )
    assert stable_key(first, ignore=("retry", "sent_at")) == stable_key({"idfa": "A"})


# -- finalise -----------------------------------------------------------------------------------


def test_finalise_applies_the_core_rules() -> None:
    event = AttributionEvent(
        kind="install",
        attributed=True,
        event_name="",
        source="  FakeNetwork Ads ",
        campaign="{campaign}",
        adgroup="",
        ad="creatívé #1",
        source_id=" 9999 ",
        campaign_id="00000000",
        idfa="00000000-0000-0000-0000-000000000000",
        idfv=" 44444444-5555-4CCC-8DDD-666666666666 ",
        google_ad_id="",
        android_id="{android_id}",
        braze_id="null",
        external_id="user-1",
        install_time=datetime(2024, 5, 1, 12, 4, 41),
        event_time=datetime(2024, 5, 1, 14, 4, 41, tzinfo=timezone(timedelta(hours=2))),
        platform=" iOS ",
        currency="usd",
        country="de",
        app_id=" com.example.fakeapp ",
    )
    out = finalise(event)
    assert out.event_name == "install"
    assert out.source == "FakeNetwork Ads"
    assert out.campaign is None
    assert out.adgroup is None
    assert out.ad == "creatívé #1"
    assert out.source_id == "9999"
    assert out.campaign_id is None
    assert out.idfa is None
    assert out.idfv == "44444444-5555-4CCC-8DDD-666666666666"
    assert out.google_ad_id is None
    assert out.android_id is None
    assert out.braze_id is None
    assert out.external_id == "user-1"
    assert out.install_time == T and out.install_time is not None
    assert out.install_time.tzinfo is UTC
    assert out.event_time == T and out.event_time is not None
    assert out.event_time.utcoffset() == timedelta(0)
    assert out.event_time.hour == 12
    assert out.platform == "ios"
    assert out.currency == "USD"
    assert out.country == "DE"
    assert out.app_id == "com.example.fakeapp"
    # The input is not changed.
    assert event.idfa == "00000000-0000-0000-0000-000000000000"


def test_finalise_event_name_defaults_to_kind_and_keeps_a_given_name() -> None:
    assert finalise(AttributionEvent(kind="reengagement", attributed=True)).event_name == (
        "reengagement"
    )
    assert finalise(
        AttributionEvent(kind="event", attributed=True, event_name="  ")
    ).event_name == ("event")
    named = finalise(AttributionEvent(kind="event", attributed=True, event_name=" purchase "))
    assert named.event_name == "purchase"


def test_finalise_keeps_what_is_already_clean() -> None:
    event = AttributionEvent(
        kind="install",
        attributed=False,
        event_name="install",
        source="Réseau Démo",
        campaign="夏のセール 🎉",
        idfv="AAAAAAAA-BBBB-4CCC-8DDD-EEEEEEEEEEE3",
        install_time=T,
        revenue=Decimal("4.99"),
    )
    out = finalise(event)
    assert out == event
    assert out.revenue == Decimal("4.99")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("campaign", ["a"]),
        ("source", {"name": "x"}),
        ("idfa", ["x"]),
        ("braze_id", {"id": 1}),
        ("ad", float("nan")),
        ("campaign", "x\x00y"),
    ],
)
def test_finalise_rejects_unusable_values_naming_the_field(field: str, value: Any) -> None:
    event = AttributionEvent(kind="install", attributed=True, **{field: value})
    with pytest.raises(MappingError) as info:
        finalise(event)
    assert info.value.field == field


def test_finalise_text_numbers_become_text() -> None:
    event = AttributionEvent(kind="install", attributed=True, adgroup_id=8812, campaign_id=123)  # type: ignore[arg-type]
    out = finalise(event)
    assert out.adgroup_id == "8812"
    assert out.campaign_id == "123"


def test_helpers_never_return_nan() -> None:
    # Every helper refuses NaN rather than storing it.
    for fn in (timestamp, number, text, device_id, flag):
        with pytest.raises(MappingError):
            fn(math.nan, "f")


# -- pick_named(loose=True), json_object ---------------------------------------------------------


def test_pick_loose_ignores_case_underscores_and_hyphens() -> None:
    obj = {"brazeId": "a", "Braze-User-ID": "b", "blank": " "}
    assert pick_named(obj, "braze_id", loose=True)[0] == "a"
    assert pick_named(obj, "braze_user_id", loose=True)[0] == "b"
    assert pick_named(obj, "blank", "missing", loose=True)[0] is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"a": 1}, {"a": 1}),
        ('{"a": {"b": 2}}', {"a": {"b": 2}}),
        ("", {}),
        (None, {}),
    ],
)
def test_json_object_takes_objects_and_json_text(value: Any, expected: dict[str, Any]) -> None:
    assert json_object(value, "custom_data") == expected


@pytest.mark.parametrize("value", ["not json", "[1, 2]", "3", [1], 5, "[" * 5000])
def test_json_object_refuses_anything_else_naming_the_field(value: Any) -> None:
    with pytest.raises(MappingError) as err:
        json_object(value, "custom_data")
    assert err.value.field == "custom_data"


def test_pick_finds_a_flat_key_that_contains_dots() -> None:
    """Query strings send nested fields flat: ?value.amount=4.99."""
    assert pick({"value.amount": "4.99"}, "value.amount") == "4.99"
    assert pick_named({"value.amount": "4.99"}, "x", "value.amount") == ("4.99", "value.amount")
    assert pick({"value": {"amount": 1}}, "value.amount") == 1
