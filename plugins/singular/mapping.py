"""Singular postback fields → the common attribution event. The table is in README.md.

Singular reaches the gateway in two shapes, both mapped here:

- internal BI postbacks: a JSON body sent by POST, with Singular's own field names
  (``event_name``, ``tracker_sub_campaign_name``, ``*_utc_timestamp``, ``aifa`` …);
- partner-style postbacks: a GET whose query string the customer writes from Singular's macros
  (``network``, ``campaign``, ``adgroup``, ``creative``, ``event``, ``utc`` …).

Where both shapes name one value differently, the BI name is tried first.
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
    json_object,
    number,
    stable_key,
    text,
    timestamp,
)

# Event names that mean an install or a reinstall (compared without case). Singular reports an
# install as __START__ in BI postbacks; partner-style templates render __INSTALL__.
INSTALL_EVENTS = frozenset({"__start__", "__install__", "install"})
REINSTALL_EVENTS = frozenset({"__reinstall__", "reinstall"})

# Network names that mean "no paid attribution" (compared without case).
ORGANIC_NETWORKS = frozenset({"organic", "unattributed", "none"})

# Where the Braze id arrives: top level (the "App Open" event argument appboyUserID, or the
# brazeDeviceID global property) or inside the nested objects Singular forwards. Keys are
# compared without case, "_" or "-".
BRAZE_KEYS = ("appboyUserID", "brazeDeviceID", "braze_device_id", "braze_id")
BRAZE_CONTAINERS = ("global_properties", "event_arguments", "arguments")

# Fields that differ between deliveries of the same postback. No Singular event id is documented;
# Singular re-sends a failed postback (after 1, 5, 15, 30 and 60 minutes) and its documentation
# names no retry counter or send-time field, so nothing is left out: the whole payload, key
# removed, identifies the event.
RETRY_VARIANT_FIELDS: tuple[str, ...] = ()


def map_postback(payload: Mapping[str, Any]) -> AttributionEvent:
    name_field, raw_name = _field(payload, "event_name", "event")
    name = text(raw_name, name_field)
    if name is None:
        raise MappingError(
            "event_name", "required: the event name (event_name, or event in a GET postback)"
        )
    reengagement = _flag(payload, "is_reengagement")
    kind, event_name = _kind(name, reengagement)
    network = _text(payload, "network")

    event_time = _time(payload, "event_utc_timestamp", "utc")
    install_time = _time(payload, "install_utc_timestamp")
    if install_time is None and kind in ("install", "reinstall"):
        install_time = event_time

    return AttributionEvent(
        kind=kind,
        event_name=event_name,
        attributed=_attributed(payload, network),
        source=network,
        campaign=_text(payload, "campaign", "tracker_campaign_name"),
        campaign_id=_id(payload, "tracker_campaign_id", "campaign_id"),
        adgroup=_text(payload, "tracker_sub_campaign_name", "adgroup"),
        adgroup_id=_id(payload, "tracker_sub_campaign_id", "adgroup_id"),
        ad=_text(payload, "tracker_creative_name", "creative"),
        ad_id=_id(payload, "tracker_creative_id", "creative_id"),
        event_time=event_time or install_time,
        install_time=install_time,
        touch_time=_time(payload, "click_utc_timestamp"),
        platform=_text(payload, "platform"),
        app_id=_text(payload, "longname"),
        idfa=_id(payload, "idfa"),
        idfv=_id(payload, "idfv"),
        google_ad_id=_id(payload, "aifa"),
        android_id=_id(payload, "andi", "android_id"),
        braze_id=_braze_id(payload),
        external_id=_id(payload, "user_id"),
        revenue=_number(payload, "revenue", "amount"),
        currency=_text(payload, "currency"),
        country=_text(payload, "country"),
        dedupe_key=stable_key(payload, ignore=RETRY_VARIANT_FIELDS),
    )


def _kind(name: str, reengagement: bool | None) -> tuple[EventKind, str]:
    """The kind and event name. A postback attributed to a re-engagement campaign is a
    re-engagement: named ``reengagement`` when it is the session start, else by its event."""
    folded = name.casefold()
    starts = folded in INSTALL_EVENTS or folded in REINSTALL_EVENTS
    if reengagement:
        return "reengagement", "reengagement" if starts else name
    if folded in INSTALL_EVENTS:
        return "install", "install"
    if folded in REINSTALL_EVENTS:
        return "reinstall", "reinstall"
    return "event", name


def _attributed(payload: Mapping[str, Any], network: str | None) -> bool:
    """Organic: ``is_organic`` true, or no network, or a network of organic/unattributed/none."""
    if _flag(payload, "is_organic"):
        return False
    return network is not None and network.casefold() not in ORGANIC_NETWORKS


def _braze_id(payload: Mapping[str, Any]) -> str | None:
    key, value = _field(payload, *BRAZE_KEYS, loose=True)
    if value is not None:
        return device_id(value, key)
    for container in BRAZE_CONTAINERS:
        inner = json_object(payload.get(container), container)
        key, value = _field(inner, *BRAZE_KEYS, loose=True)
        if value is not None:
            return device_id(value, f"{container}.{key}")
    return None


# -- every value goes through a gateway.normalise helper, naming the field it came from ---------


def _text(payload: Mapping[str, Any], *names: str) -> str | None:
    return text(*_value_and_field(payload, names))


def _id(payload: Mapping[str, Any], *names: str) -> str | None:
    return device_id(*_value_and_field(payload, names))


def _time(payload: Mapping[str, Any], *names: str) -> datetime | None:
    return timestamp(*_value_and_field(payload, names))


def _flag(payload: Mapping[str, Any], *names: str) -> bool | None:
    return flag(*_value_and_field(payload, names))


def _number(payload: Mapping[str, Any], *names: str) -> Decimal | None:
    return number(*_value_and_field(payload, names))


def _value_and_field(payload: Mapping[str, Any], names: tuple[str, ...]) -> tuple[Any, str]:
    field, value = _field(payload, *names)
    return value, field


# core candidate: gateway.normalise.pick() / pick_loose() that also return *which* field they
# took. Partners that send one value under several names (Singular's GET and POST shapes,
# alias lists elsewhere) need it so that a MappingError names the field actually sent.
def _field(obj: Mapping[str, Any], *names: str, loose: bool = False) -> tuple[str, Any]:
    """The first of ``names`` present in ``obj`` (not null or blank), as (its key, its value);
    ``(names[0], None)`` when none is. ``loose`` compares keys without case, ``_`` or ``-``."""
    for name in names:
        if not loose:
            if _present(obj.get(name)):
                return name, obj[name]
            continue
        for key, value in obj.items():
            if isinstance(key, str) and _fold(key) == _fold(name) and _present(value):
                return key, value
    return names[0], None


def _present(value: Any) -> bool:
    """Not null and not blank text: what gateway.normalise.pick() counts as present."""
    return value is not None and not (isinstance(value, str) and not value.strip())


def _fold(name: str) -> str:
    return name.casefold().replace("_", "").replace("-", "")
