"""TUNE (Attribution Analytics, formerly MobileAppTracking) postback fields → the common event.

TUNE fills a postback URL template with its macros and sends it by GET, so every value arrives
as text in the query string. The mapping table, the organic rule and the dedupe key are in
README.md beside this file.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

from gateway import AttributionEvent, MappingError
from gateway.events import EventKind
from gateway.normalise import (
    device_id,
    flag,
    number,
    pick,
    pick_named,
    stable_key,
    text,
    timestamp,
)

# TUNE's event names for installs; anything else is an in-app event (or a re-engagement).
INSTALL_KINDS: dict[str, EventKind] = {"install": "install", "reinstall": "reinstall"}

# Each time TUNE sends in three forms ({x_datetime} "YYYY-MM-DD HH:MM:SS" in UTC, {x_timestamp}
# epoch seconds, {x_timestamp_milliseconds} epoch milliseconds), most precise first.
CONVERSION_TIME = (
    "conversion_timestamp_milliseconds",
    "conversion_timestamp",
    "conversion_datetime",
)
CLICK_TIME = ("session_timestamp_milliseconds", "session_timestamp", "session_datetime")
IMPRESSION_TIME = (
    "impression_timestamp_milliseconds",
    "impression_timestamp",
    "impression_datetime",
)

# Fields that differ between two deliveries of the same postback, left out of the dedupe key:
# the retry counter, the bare date/time macros (the time the postback is rendered, not the
# conversion's) and the revenue converted at the day's exchange rate.
RETRY_VARYING = (
    "retry_attempts",
    "date",
    "time",
    "datetime",
    "timestamp",
    "timestamp_milliseconds",
    "revenue_usd",
)


def map_postback(payload: Mapping[str, Any]) -> AttributionEvent:
    name = text(pick(payload, "event_name"), "event_name")
    if name is None:
        raise MappingError("event_name", "required: add event_name={event_name} to the postback")
    kind = _kind(payload, name)
    event_time = _first_time(payload, *CONVERSION_TIME)
    publisher_id = device_id(pick(payload, "publisher_id"), "publisher_id")
    sub_publisher = _name(payload, "advertiser_sub_publisher", "advertiser_sub_publisher_name")
    publisher_name = _name(payload, "publisher_name")
    revenue, currency = _revenue(payload)

    return AttributionEvent(
        kind=kind,
        event_name=kind if kind in INSTALL_KINDS else name,
        # Organic: neither a publisher nor a sub-publisher (empty or zero).
        attributed=bool(sub_publisher or publisher_id or publisher_name),
        source=sub_publisher or publisher_name,
        source_id=publisher_id,
        campaign=_name(payload, "advertiser_sub_campaign", "advertiser_sub_campaign_name")
        or _name(payload, "campaign_name"),
        campaign_id=device_id(pick(payload, "campaign_id"), "campaign_id"),
        adgroup=_name(payload, "advertiser_sub_adgroup", "advertiser_sub_adgroup_name"),
        ad=_name(payload, "advertiser_sub_ad", "advertiser_sub_ad_name"),
        event_time=event_time,
        install_time=event_time if kind in INSTALL_KINDS else None,
        touch_time=_first_time(payload, *CLICK_TIME) or _first_time(payload, *IMPRESSION_TIME),
        platform=text(*pick_named(payload, "mobile_app_type", "sdk")),
        app_id=text(pick(payload, "package_name"), "package_name"),
        idfa=device_id(pick(payload, "ios_ifa"), "ios_ifa"),
        idfv=device_id(pick(payload, "ios_ifv"), "ios_ifv"),
        google_ad_id=device_id(pick(payload, "google_aid"), "google_aid"),
        android_id=device_id(pick(payload, "android_id"), "android_id"),
        # The Braze integration has the app set TUNE's user id to the Braze device id.
        braze_id=device_id(pick(payload, "user_id"), "user_id"),
        revenue=revenue,
        currency=currency,
        country=text(pick(payload, "country_code"), "country_code"),
        # No TUNE macro is documented as unique to one conversion ({site_event_id} is the same
        # for every purchase): hash the payload, without what changes between deliveries.
        dedupe_key=stable_key(payload, ignore=RETRY_VARYING),
    )


def _kind(payload: Mapping[str, Any], name: str) -> EventKind:
    install = INSTALL_KINDS.get(name.lower())
    if install is not None:
        return install
    if flag(pick(payload, "is_reengagement"), "is_reengagement"):
        return "reengagement"
    return "event"


def _name(payload: Mapping[str, Any], *fields: str) -> str | None:
    """The first of ``fields`` that holds a name. "0" (what TUNE sends for no publisher) and the
    null words of the core's id rule count as none."""
    for field in fields:
        value = text(payload.get(field), field)
        if value is not None and device_id(value, field) is not None:
            return value
    return None


def _revenue(payload: Mapping[str, Any]) -> tuple[Decimal | None, str | None]:
    currency = text(pick(payload, "currency_code"), "currency_code")
    amount = number(*pick_named(payload, "revenue", "amount"))
    if amount is not None:
        return amount, currency
    amount_usd = number(pick(payload, "revenue_usd"), "revenue_usd")
    if amount_usd is not None:
        return amount_usd, "USD"
    return None, currency


# Private: unlike pick_named(), it checks every form sent, not only the first, and no other
# partner needs that (Kochava's two forms of a time take the first sent).
def _first_time(payload: Mapping[str, Any], *fields: str) -> datetime | None:
    """The first of ``fields`` that holds a time, as UTC. Every present field is parsed, so an
    unusable one answers 422 naming it even when another form of the same time is good."""
    found = None
    for field in fields:
        moment = timestamp(payload.get(field), field)
        if found is None:
            found = moment
    return found
