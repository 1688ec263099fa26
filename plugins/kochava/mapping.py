"""Kochava postback fields → the common attribution event. The table is in README.md."""

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
    pick,
    pick_named,
    text,
    timestamp,
)

ORGANIC_NETWORKS = frozenset({"unattributed", "organic", "none"})
REENGAGEMENT_TYPES = frozenset({"reengagement", "re-engagement", "reattribution", "retargeting"})
INSTALL_EVENT_NAMES = frozenset({"_install", "install"})

# Keys under which the Braze id arrives inside an identity link (compared without case, "_" or
# "-", so brazeId and Braze_User_ID match too).
BRAZE_ALIASES = (
    "braze_id",
    "braze",
    "braze_user_id",
    "braze_device_id",
    "appboy_id",
    "appboy_user_id",
)
EXTERNAL_ID_ALIASES = ("external_id", "user_id", "customer_id")


def map_postback(payload: Mapping[str, Any]) -> AttributionEvent:
    attribution_type = text(pick(payload, "attribution_type"), "attribution_type")
    event_name = text(pick(payload, "event_name"), "event_name")
    kind = _kind(attribution_type, event_name)
    if kind == "event" and event_name is None:
        raise MappingError("event_name", "required: name the in-app event or the install")
    if kind in ("install", "reinstall") or (event_name or "").lower() in INSTALL_EVENT_NAMES:
        event_name = kind
    network = text(*pick_named(payload, "network_name", "network"))
    install_time = timestamp(*pick_named(payload, "install_time", "install_date"))
    event_time = timestamp(*pick_named(payload, "event_time", "event_date"))
    identity = json_object(payload.get("identity_link"), "identity_link")
    braze = _linked(identity, *BRAZE_ALIASES)
    if not braze[0]:  # none (or a false or empty value) in the identity link
        braze = pick_named(payload, "braze_id")

    return AttributionEvent(
        kind=kind,
        event_name=event_name or kind,
        attributed=_attributed(payload, network),
        source=network,
        source_id=device_id(pick(payload, "network_id"), "network_id"),
        campaign=text(*pick_named(payload, "campaign_name", "campaign_id")),
        campaign_id=device_id(pick(payload, "campaign_id"), "campaign_id"),
        adgroup=text(*pick_named(payload, "adgroup_name", "site_id")),
        adgroup_id=device_id(*pick_named(payload, "adgroup_id", "site_id")),
        ad=text(*pick_named(payload, "creative_name", "creative_id")),
        ad_id=device_id(pick(payload, "creative_id"), "creative_id"),
        event_time=event_time or install_time,
        install_time=install_time,
        touch_time=timestamp(*pick_named(payload, "click_time", "impression_time")),
        platform=text(*pick_named(payload, "platform", "device_os")),
        app_id=text(
            *pick_named(
                payload, "app_bundle_id", "app_package", "app_id", "package_name", "bundle_id"
            )
        ),
        idfa=device_id(pick(payload, "idfa"), "idfa"),
        idfv=device_id(pick(payload, "idfv"), "idfv"),
        google_ad_id=device_id(*pick_named(payload, "adid", "gaid", "google_ad_id")),
        android_id=device_id(pick(payload, "android_id"), "android_id"),
        windows_ad_id=device_id(*pick_named(payload, "waid", "windows_ad_id")),
        partner_device_id=device_id(pick(payload, "kochava_device_id"), "kochava_device_id"),
        braze_id=device_id(*braze),
        external_id=device_id(*_linked(identity, *EXTERNAL_ID_ALIASES)),
        revenue=_revenue(payload),
        currency=text(*pick_named(payload, "currency", "currency_code")),
        country=text(*pick_named(payload, "country", "country_code")),
        dedupe_key=text(pick(payload, "transaction_id"), "transaction_id") or "",
    )


def _kind(attribution_type: str | None, event_name: str | None) -> EventKind:
    attribution_type = (attribution_type or "").lower()
    event_name = (event_name or "").lower()
    if attribution_type in REENGAGEMENT_TYPES:
        return "reengagement"
    if attribution_type == "reinstall" or event_name == "_reinstall":
        return "reinstall"
    if attribution_type == "install" or event_name in INSTALL_EVENT_NAMES:
        return "install"
    return "event"


def _attributed(payload: Mapping[str, Any], network: str | None) -> bool:
    """Organic: no network, a network of unattributed/organic/none, or ``attribution`` false."""
    if network is None or network.casefold() in ORGANIC_NETWORKS:
        return False
    return flag(payload.get("attribution"), "attribution") is not False


def _linked(identity: Mapping[str, Any], *aliases: str) -> tuple[Any, str]:
    """The first of ``aliases`` in the identity link, with its field as the partner spelt it
    (``identity_link.brazeId``)."""
    value, key = pick_named(identity, *aliases, loose=True)
    return value, f"identity_link.{key}"


def _revenue(payload: Mapping[str, Any]) -> Any:
    if pick(payload, "revenue") is not None:
        return number(payload["revenue"], "revenue")
    # event_value is free-form: a number for purchases, JSON or text for other events.
    try:
        return number(pick(payload, "event_value"), "event_value")
    except MappingError:
        return None
