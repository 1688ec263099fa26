"""Adjust callback fields → the common attribution event. The table is in README.md.

Adjust sends a GET request to the callback URL configured in its dashboard, with the values of the
placeholders in that URL filled in; placeholders without data are dropped from the callback. So
every field below is optional on the wire, and the field names are the query keys the callback
template uses (this mapping expects the placeholder's own name as key, e.g. ``idfa={idfa}``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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

# activity_kind → the common kind. Adjust writes some kinds with a space ("reattribution
# reinstall") and some with an underscore; both are compared as underscores, without case.
KINDS: dict[str, EventKind] = {
    "install": "install",
    "reinstall": "reinstall",
    # A lapsed user's reinstall attributed to a new source: an install on the device.
    "reattribution_reinstall": "reinstall",
    "reattribution": "reengagement",
    "event": "event",
}

# Network names Adjust gives unattributed installs (its "Organic" link).
ORGANIC_NETWORKS = frozenset({"organic"})

# tracker_name is "network::campaign::adgroup::creative"; it fills the slots the *_name
# placeholders leave empty.
TRACKER_SEPARATOR = "::"

# Fields left out of the dedupe hash: they describe the device's attribution at the time of
# sending, not the activity. Adjust retries a failed callback for up to a day, and an updated
# attribution in between must not turn a retry into a second event. Two distinct activities of
# one device never differ only in these: they differ in created_at, the event or its values.
ATTRIBUTION_STATE = (
    "network_name",
    "campaign_name",
    "adgroup_name",
    "creative_name",
    "tracker",
    "tracker_name",
    "is_organic",
)


def map_postback(payload: Mapping[str, Any]) -> Sequence[AttributionEvent]:
    """One Adjust callback → one event, or none for activities that carry no attribution
    (sessions, clicks, impressions, rejected installs, uninstalls, ad spend, …): those are
    answered 200 ``ignored`` / ``no_events`` so a global callback does not fill storage."""
    kind = _kind(payload)
    if kind is None:
        return []

    network, campaign, adgroup, ad = _attribution(payload)
    created_at = _time(payload, "created_at")
    installed_at = _time(payload, "installed_at")
    reattributed_at = _time(payload, "reattributed_at")
    # The time the attribution happened: what conversion_duration counts to, and the event time
    # when created_at is missing. For a reinstall, installed_at need not be this install's time.
    anchor = {"install": installed_at, "reengagement": reattributed_at}.get(kind)
    partner_params = _partner_parameters(payload)

    event = AttributionEvent(
        kind=kind,
        event_name=_event_name(payload, kind),
        attributed=_attributed(payload, network),
        source=network,
        campaign=campaign,
        adgroup=adgroup,
        ad=ad,
        event_time=created_at or anchor,
        install_time=installed_at,
        touch_time=_touch_time(payload, anchor),
        platform=_text(payload, "os_name"),
        app_id=_text(payload, "app_id"),
        idfa=_id(payload, "idfa"),
        idfv=_id(payload, "idfv"),
        google_ad_id=_id(payload, "gps_adid"),
        android_id=_id(payload, "android_id"),
        windows_ad_id=_id(payload, "win_adid"),
        partner_device_id=_id(payload, "adid"),
        braze_id=_id(payload, "braze_device_id", "braze_id")
        or _id(partner_params, "braze_device_id", "braze_id", prefix="partner_parameters."),
        external_id=_id(payload, "external_id")
        or _id(partner_params, "external_id", prefix="partner_parameters."),
        revenue=_revenue(payload),
        currency=_text(payload, "currency"),
        country=_text(payload, "country"),
        dedupe_key=stable_key(payload, ignore=ATTRIBUTION_STATE),
    )
    return [event]


# -- the rules ----------------------------------------------------------------------------------


def _kind(payload: Mapping[str, Any]) -> EventKind | None:
    """The common kind from activity_kind; None for activities that are not ours to store.

    Without activity_kind (a per-event callback template that left it out) an event token or
    event name still makes it an in-app event."""
    activity = _text(payload, "activity_kind")
    if activity is None:
        if pick(payload, "event_name", "event") is not None:
            return "event"
        raise MappingError("activity_kind", "required: install, reattribution, event, …")
    return KINDS.get(activity.casefold().replace(" ", "_").replace("-", "_"))


def _event_name(payload: Mapping[str, Any], kind: EventKind) -> str:
    if kind in ("install", "reinstall"):
        return kind
    if kind == "reengagement":
        return "reattribution"
    # event_name is the label set in Adjust's dashboard; the event token is the fallback.
    name = text(*pick_named(payload, "event_name", "event"))
    if name is None:
        raise MappingError("event_name", "required for an in-app event (or the event token)")
    return name


def _attribution(
    payload: Mapping[str, Any],
) -> tuple[str | None, str | None, str | None, str | None]:
    """network, campaign, adgroup, creative: the *_name placeholders, each falling back to its
    segment of tracker_name."""
    tracker = _text(payload, "tracker_name")
    parts = tracker.split(TRACKER_SEPARATOR) if tracker else []
    segments = [text(part, "tracker_name") for part in parts[:4]]
    segments += [None] * (4 - len(segments))
    names = ("network_name", "campaign_name", "adgroup_name", "creative_name")
    network, campaign, adgroup, ad = (
        _text(payload, name) or segment for name, segment in zip(names, segments, strict=True)
    )
    return network, campaign, adgroup, ad


def _attributed(payload: Mapping[str, Any], network: str | None) -> bool:
    """Organic: is_organic true (1), or the network is Adjust's "Organic" (any case), or no
    network at all."""
    if flag(pick(payload, "is_organic"), "is_organic"):
        return False
    return network is not None and network.casefold() not in ORGANIC_NETWORKS


def _touch_time(payload: Mapping[str, Any], anchor: datetime | None) -> datetime | None:
    """The click (or engagement) time where the template sends it; else the install or
    reattribution time minus conversion_duration (seconds from click to install)."""
    for name in ("click_time", "engagement_time", "impression_time"):
        moment = _time(payload, name)
        if moment is not None:
            return moment
    if anchor is None:
        return None
    seconds = number(pick(payload, "conversion_duration"), "conversion_duration")
    if seconds is None:
        return None
    if seconds < 0:
        raise MappingError("conversion_duration", "must not be negative")
    # The core's timestamp() turns the resulting epoch into UTC and checks its range.
    return timestamp(anchor.timestamp() - float(seconds), "conversion_duration")


def _revenue(payload: Mapping[str, Any]) -> Decimal | None:
    """revenue_float (whole currency units) where sent, else revenue. Adjust documents its
    {revenue} placeholder in cents for ad revenue; the callbacks this partner receives send whole
    units under ``revenue`` (4.99), so the template should map ``revenue={revenue_float}``."""
    return number(*pick_named(payload, "revenue_float", "revenue"))


def _partner_parameters(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """The {partner_parameters} placeholder, when the template carries it: a JSON object of the
    app's partner parameters. Anything else there is not ours to refuse a callback over."""
    try:
        return json_object(pick(payload, "partner_parameters"), "partner_parameters")
    except MappingError:
        return {}


# -- field access -------------------------------------------------------------------------------
# One field needs no pick(): text(), timestamp() and device_id() already take a blank value or
# an unfilled {macro} as not sent.


def _text(payload: Mapping[str, Any], field: str) -> str | None:
    return text(payload.get(field), field)


def _time(payload: Mapping[str, Any], field: str) -> datetime | None:
    return timestamp(payload.get(field), field)


def _id(payload: Mapping[str, Any], *fields: str, prefix: str = "") -> str | None:
    for field in fields:
        found = device_id(payload.get(field), prefix + field)
        if found is not None:
            return found
    return None
