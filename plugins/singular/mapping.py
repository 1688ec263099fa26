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
from typing import Any

from gateway import AttributionEvent, MappingError
from gateway.events import EventKind
from gateway.normalise import (
    device_id,
    flag,
    json_object,
    number,
    pick_named,
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
    name = text(*pick_named(payload, "event_name", "event"))
    if name is None:
        raise MappingError(
            "event_name", "required: the event name (event_name, or event in a GET postback)"
        )
    reengagement = flag(*pick_named(payload, "is_reengagement"))
    kind, event_name = _kind(name, reengagement)
    network = text(*pick_named(payload, "network"))

    event_time = timestamp(*pick_named(payload, "event_utc_timestamp", "utc"))
    install_time = timestamp(*pick_named(payload, "install_utc_timestamp"))
    if install_time is None and kind in ("install", "reinstall"):
        install_time = event_time

    return AttributionEvent(
        kind=kind,
        event_name=event_name,
        attributed=_attributed(payload, network),
        source=network,
        campaign=text(*pick_named(payload, "campaign", "tracker_campaign_name")),
        campaign_id=device_id(*pick_named(payload, "tracker_campaign_id", "campaign_id")),
        adgroup=text(*pick_named(payload, "tracker_sub_campaign_name", "adgroup")),
        adgroup_id=device_id(*pick_named(payload, "tracker_sub_campaign_id", "adgroup_id")),
        ad=text(*pick_named(payload, "tracker_creative_name", "creative")),
        ad_id=device_id(*pick_named(payload, "tracker_creative_id", "creative_id")),
        event_time=event_time or install_time,
        install_time=install_time,
        touch_time=timestamp(*pick_named(payload, "click_utc_timestamp")),
        platform=text(*pick_named(payload, "platform")),
        app_id=text(*pick_named(payload, "longname")),
        idfa=device_id(*pick_named(payload, "idfa")),
        idfv=device_id(*pick_named(payload, "idfv")),
        google_ad_id=device_id(*pick_named(payload, "aifa")),
        android_id=device_id(*pick_named(payload, "andi", "android_id")),
        braze_id=_braze_id(payload),
        external_id=device_id(*pick_named(payload, "user_id")),
        revenue=number(*pick_named(payload, "revenue", "amount")),
        currency=text(*pick_named(payload, "currency")),
        country=text(*pick_named(payload, "country")),
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
    if flag(*pick_named(payload, "is_organic")):
        return False
    return network is not None and network.casefold() not in ORGANIC_NETWORKS


def _braze_id(payload: Mapping[str, Any]) -> str | None:
    value, key = pick_named(payload, *BRAZE_KEYS, loose=True)
    if value is not None:
        return device_id(value, key)
    for container in BRAZE_CONTAINERS:
        inner = json_object(payload.get(container), container)
        value, key = pick_named(inner, *BRAZE_KEYS, loose=True)
        if value is not None:
            return device_id(value, f"{container}.{key}")
    return None
