"""Example Partner postback fields → the common attribution event.

Change the field names on the right of each line to the partner's own (see its postback
documentation and its macro list); keep every value going through a gateway.normalise helper,
so times, ids, flags and numbers follow the core's rules and bad values answer 422 naming the
partner's field. Record the mapping in README.md's table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway import AttributionEvent, MappingError
from gateway.events import EventKind
from gateway.normalise import device_id, flag, number, pick, pick_named, text, timestamp

# Event names that mean an install, a reinstall or a re-engagement; anything else is an in-app
# event. Change them to the partner's own names.
KINDS: dict[str, EventKind] = {
    "install": "install",
    "reinstall": "reinstall",
    "reengagement": "reengagement",
}

# Network names the partner uses for "no paid attribution".
ORGANIC_NETWORKS = frozenset({"organic", "unattributed", "none"})


def map_postback(payload: Mapping[str, Any]) -> AttributionEvent:
    """One postback (query string and body merged, key removed) → one event.

    Raise MappingError(field, reason) for anything unusable; any other exception is a bug the
    conformance kit will report.
    """
    name = text(pick(payload, "event"), "event")
    if name is None:
        raise MappingError("event", "required: the install or in-app event name")
    kind = KINDS.get(name.lower(), "event")
    network = text(pick(payload, "network"), "network")

    return AttributionEvent(
        kind=kind,
        event_name=kind if kind != "event" else name,
        attributed=_attributed(payload, network),
        # The four attribution slots: network, campaign, ad group (or site), ad (creative).
        source=network,
        # pick_named() returns the field the value came from, so a bad value is named as sent.
        campaign=text(*pick_named(payload, "campaign", "campaign_id")),
        adgroup=text(*pick_named(payload, "adgroup", "adgroup_id")),
        ad=text(*pick_named(payload, "creative", "creative_id")),
        source_id=device_id(pick(payload, "network_id"), "network_id"),
        campaign_id=device_id(pick(payload, "campaign_id"), "campaign_id"),
        adgroup_id=device_id(pick(payload, "adgroup_id"), "adgroup_id"),
        ad_id=device_id(pick(payload, "creative_id"), "creative_id"),
        # Times: timestamp() takes ISO-8601 and epoch seconds/milliseconds, returns UTC.
        event_time=timestamp(*pick_named(payload, "event_time", "install_time")),
        install_time=timestamp(pick(payload, "install_time"), "install_time"),
        touch_time=timestamp(pick(payload, "click_time"), "click_time"),
        platform=text(pick(payload, "platform"), "platform"),
        app_id=text(pick(payload, "app_id"), "app_id"),
        # Device ids: device_id() turns empty, all-zero and unfilled macros into None.
        idfa=device_id(pick(payload, "idfa"), "idfa"),
        idfv=device_id(pick(payload, "idfv"), "idfv"),
        google_ad_id=device_id(pick(payload, "gaid"), "gaid"),
        android_id=device_id(pick(payload, "android_id"), "android_id"),
        # User ids: where the partner passes the Braze id and your own user id.
        braze_id=device_id(pick(payload, "braze_id"), "braze_id"),
        external_id=device_id(pick(payload, "user_id"), "user_id"),
        revenue=number(pick(payload, "revenue"), "revenue"),
        currency=text(pick(payload, "currency"), "currency"),
        country=text(pick(payload, "country"), "country"),
        # Dedupe key: the partner's own unique id for the postback, the same on every retry.
        # Without one, leave it empty: the core hashes the payload (see README.md).
        dedupe_key=text(pick(payload, "event_id"), "event_id") or "",
    )


def _attributed(payload: Mapping[str, Any], network: str | None) -> bool:
    """The organic rule: an organic flag, or no network, or an organic network name."""
    if flag(pick(payload, "is_organic"), "is_organic"):
        return False
    return network is not None and network.casefold() not in ORGANIC_NETWORKS
