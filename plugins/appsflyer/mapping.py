"""AppsFlyer Push API messages → the common attribution event. The table is in README.md.

AppsFlyer sends one message per conversion (install, reinstall, re-engagement, re-attribution)
or in-app event, as a JSON body (POST) or a query string (GET), with the fields chosen in its
Push API settings. An empty field may arrive as null or "" or not at all; all three mean "not
sent".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

from gateway import AttributionEvent, MappingError
from gateway.events import EventKind
from gateway.normalise import (
    device_id,
    flag,
    json_object,
    number,
    pick,
    pick_named,
    stable_key,
    text,
    timestamp,
)

# event_name of the conversion messages, compared without case, "-" or "_"; any other
# event_name is an in-app event. A re-attribution is a reinstall won by a retargeting campaign.
CONVERSIONS: dict[str, EventKind] = {
    "install": "install",
    "reinstall": "reinstall",
    "reattribution": "reinstall",
    "reengagement": "reengagement",
}

ORGANIC = "organic"
# The media source AppsFlyer writes when it withholds the network (README.md, "Restricted").
RESTRICTED = "restricted"
RETARGETING = "retargeting"

# Keys of custom_data that carry the Braze device id: brazeDeviceId (set by Braze's iOS
# integration) and brazeCustomerId (its Android integration); compared without case, "_", "-".
BRAZE_KEYS = ("brazeDeviceId", "brazeCustomerId")

# Fields showing the app's settings when the message is sent, not facts of the event: a retry
# sent after an admin changed the app's time zone or currency differs only in them.
SETTINGS_FIELDS = frozenset({"selected_timezone", "selected_currency"})
# <time field>_selected_timezone: the same moment in the app's time zone, with its offset.
SELECTED_TZ = "_selected_timezone"
_OFFSET = re.compile(r"(?:Z|[+-]\d\d:?\d\d)$", re.IGNORECASE)


def map_postback(payload: Mapping[str, Any]) -> AttributionEvent:
    name = text(pick(payload, "event_name"), "event_name")
    if name is None:
        raise MappingError("event_name", "required: install, re-engagement, … or the event name")
    retargeting = flag(pick(payload, "is_retargeting"), "is_retargeting")
    campaign_type = text(pick(payload, "campaign_type"), "campaign_type")
    conversion = CONVERSIONS.get(_fold(name))
    kind = conversion or _in_app_kind(retargeting, campaign_type)
    media_source = text(pick(payload, "media_source"), "media_source")
    install_time = _time(payload, "install_time")
    event_time = _time(payload, "event_time")
    if event_time is None and kind in ("install", "reinstall"):
        event_time = install_time
    revenue, currency = _revenue(payload)

    return AttributionEvent(
        kind=kind,
        event_name=kind if conversion is not None else name,
        attributed=_attributed(media_source, campaign_type),
        source=None if _is(media_source, RESTRICTED) else media_source,
        campaign=text(*pick_named(payload, "campaign", "af_c_id")),
        campaign_id=device_id(pick(payload, "af_c_id"), "af_c_id"),
        adgroup=text(*pick_named(payload, "af_adset", "af_adset_id")),
        adgroup_id=device_id(pick(payload, "af_adset_id"), "af_adset_id"),
        ad=text(*pick_named(payload, "af_ad", "af_ad_id")),
        ad_id=device_id(pick(payload, "af_ad_id"), "af_ad_id"),
        event_time=event_time,
        install_time=install_time,
        touch_time=_time(payload, "attributed_touch_time"),
        platform=text(pick(payload, "platform"), "platform"),
        app_id=text(*pick_named(payload, "bundle_id", "app_id")),
        idfa=device_id(pick(payload, "idfa"), "idfa"),
        idfv=device_id(pick(payload, "idfv"), "idfv"),
        google_ad_id=device_id(pick(payload, "advertising_id"), "advertising_id"),
        android_id=device_id(pick(payload, "android_id"), "android_id"),
        partner_device_id=device_id(pick(payload, "appsflyer_id"), "appsflyer_id"),
        braze_id=_braze_id(payload),
        external_id=device_id(pick(payload, "customer_user_id"), "customer_user_id"),
        revenue=revenue,
        currency=currency,
        country=text(pick(payload, "country_code"), "country_code"),
        dedupe_key=_dedupe_key(payload),
    )


def _in_app_kind(retargeting: bool | None, campaign_type: str | None) -> EventKind:
    """An in-app event (any event_name but the conversions') is ``reengagement`` when a
    retargeting campaign brought it (as Kochava's are), else ``event``."""
    if retargeting or _is(campaign_type, RETARGETING):
        return "reengagement"
    return "event"


def _attributed(media_source: str | None, campaign_type: str | None) -> bool:
    """Organic: media_source or campaign_type ``organic`` (any case), or neither sent."""
    if _is(media_source, ORGANIC) or _is(campaign_type, ORGANIC):
        return False
    return media_source is not None or campaign_type is not None


def _time(payload: Mapping[str, Any], field: str) -> datetime | None:
    """The UTC field (``yyyy-mm-dd hh:mm:ss.sss``), else its ``_selected_timezone`` twin."""
    value = timestamp(payload.get(field), field)  # blank or {macro}: None, as with pick()
    if value is not None:
        return value
    local_field = field + SELECTED_TZ
    return _zoned_timestamp(pick(payload, local_field), local_field)


# A time that must carry its own zone (a local-time field); without an offset it cannot be placed
# in UTC, so it is refused instead of being taken as UTC. Private: no other partner sends one.
def _zoned_timestamp(value: Any, field: str) -> datetime | None:
    if isinstance(value, str) and ":" in value and not _OFFSET.search(value.strip()):
        raise MappingError(field, f"expected a time with its UTC offset, got {value.strip()!r}")
    return timestamp(value, field)


def _revenue(payload: Mapping[str, Any]) -> tuple[Decimal | None, str | None]:
    """event_revenue / event_revenue_currency; where one is not sent, af_revenue / af_currency
    from event_value (JSON text). event_value is read only then."""
    revenue = number(pick(payload, "event_revenue"), "event_revenue")
    currency = text(pick(payload, "event_revenue_currency"), "event_revenue_currency")
    if revenue is None or currency is None:
        values = json_object(payload.get("event_value"), "event_value")
        if revenue is None:
            revenue = number(pick(values, "af_revenue"), "event_value.af_revenue")
        if currency is None:
            currency = text(pick(values, "af_currency"), "event_value.af_currency")
    return revenue, currency


def _braze_id(payload: Mapping[str, Any]) -> str | None:
    custom = json_object(payload.get("custom_data"), "custom_data")
    for key in BRAZE_KEYS:
        found, sent_as = pick_named(custom, key, loose=True)
        value = device_id(found, f"custom_data.{sent_as}")
        if value is not None:
            return value
    return None


def _dedupe_key(payload: Mapping[str, Any]) -> str:
    """AppsFlyer sends no event id and marks retries only in its own reports, so a retry is the
    same message again: hash its sent fields, leaving out the settings fields."""
    sent = _sent(payload)
    # A _selected_timezone twin repeats its UTC field; it only counts when that is missing.
    stable = {
        k: v
        for k, v in sent.items()
        if k not in SETTINGS_FIELDS
        and not (k.endswith(SELECTED_TZ) and k.removesuffix(SELECTED_TZ) in sent)
    }
    return stable_key(stable)


# The fields actually sent: an empty field sent as null, as "" or not at all (AppsFlyer has done
# all three) hashes the same. Private: the other partners hash the payload as sent.
def _sent(payload: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in payload.items()
        if v is not None and not (isinstance(v, str) and not v.strip())
    }


def _is(value: str | None, word: str) -> bool:
    return value is not None and value.casefold() == word


def _fold(name: str) -> str:
    return name.casefold().replace("-", "").replace("_", "")
