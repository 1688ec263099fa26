"""Branch webhook fields → the common attribution event. The table is in README.md.

Branch posts one event of its event ontology per webhook (or a JSON array of them, which the core
splits): top-level ``id``, ``name``, ``timestamp``; the attribution nested in
``last_attributed_touch_data`` (keys with a ``~`` prefix), device and user ids in ``user_data``,
the transaction in ``event_data`` and the app's own keys in ``custom_data``.

A GET webhook carries the same fields in the query string under Branch's log-level names, where
each nested key is spelt ``<object>_<key>`` with ``~`` written ``tilde_`` and ``$`` written
``dollar_`` (``last_attributed_touch_data_tilde_campaign``, ``user_data_idfa``). Nested objects
may also arrive as JSON text. Every lookup below tries the nested form, then the flat one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
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

TOUCH = "last_attributed_touch_data"
USER = "user_data"
EVENT_DATA = "event_data"
CUSTOM = "custom_data"
INSTALL_ACTIVITY = "install_activity"
NESTED = (TOUCH, USER, EVENT_DATA, CUSTOM, INSTALL_ACTIVITY)

# Branch event names (compared without case) that are not in-app events. An OPEN is mapped to a
# re-engagement: Branch sends attribution with an open only when a touch brought the user back;
# an open without touch data is organic and ignored like any other organic event.
KINDS: dict[str, EventKind] = {
    "install": "install",
    "reinstall": "reinstall",
    "open": "reengagement",
}

BRAZE_KEY = "$braze_install_id"
# Where the Braze id may sit: Branch passes request metadata through, and apps put it in custom
# data, so it can be in any object. The first one present wins: the top level, then these.
BRAZE_OBJECTS = (CUSTOM, USER, EVENT_DATA, TOUCH)

# Prefixes Branch spells out in log-level (flat) field names.
_FLAT_PREFIXES = (("~", "tilde_"), ("$", "dollar_"), ("+", "plus_"))


class BranchPayload:
    """One Branch payload with its nested objects decoded, looked up nested-first then flat."""

    def __init__(self, payload: Mapping[str, Any]) -> None:
        self.payload = payload
        self.objects = {name: json_object(payload.get(name), name) for name in NESTED}
        # What lookups see: the nested objects decoded, so that dotted paths reach into them. A
        # nested or flat value, or the Braze id, that holds only blanks (an empty object) counts
        # as not sent, as in has_touch(), so the next place is tried.
        flat = tuple(f"{name}_" for name in NESTED)
        sent = {
            k: v
            for k, v in payload.items()
            if _present(v) or not (k == BRAZE_KEY or str(k).startswith(flat))
        }
        nested = {n: {k: v for k, v in o.items() if _present(v)} for n, o in self.objects.items()}
        self.decoded = {**sent, **nested}

    def text(self, obj: str | None, *keys: str) -> str | None:
        value, field = self.first(obj, keys)
        return text(value, field)

    def id(self, obj: str | None, *keys: str) -> str | None:
        value, field = self.first(obj, keys)
        return device_id(value, field)

    def time(self, obj: str | None, *keys: str) -> datetime | None:
        value, field = self.first(obj, keys)
        return timestamp(value, field)

    def first(self, obj: str | None, keys: Iterable[str]) -> tuple[Any, str]:
        """The first of ``keys`` present in ``obj`` (None = top level), nested then flat, and the
        field it came from as the partner spells it; the first key's field when none is."""
        return pick_named(self.decoded, *_paths(obj, keys))

    def braze_id(self) -> tuple[Any, str]:
        """The Braze id and the field it came from: top level first, then each object in
        BRAZE_OBJECTS order, nested or flat."""
        paths = [BRAZE_KEY]
        for obj in BRAZE_OBJECTS:
            paths += _paths(obj, (BRAZE_KEY,))
        return pick_named(self.decoded, *paths)

    def has_touch(self) -> bool:
        """Whether any touch data came: a non-blank value in ``last_attributed_touch_data`` or
        in one of its flat ``last_attributed_touch_data_*`` fields."""
        flat = {
            k: v
            for k, v in self.payload.items()
            if isinstance(k, str) and k.startswith(TOUCH + "_")
        }
        return any(_present(v) for v in (*self.objects[TOUCH].values(), *flat.values()))


def map_postback(payload: Mapping[str, Any]) -> AttributionEvent:
    """One Branch event (query string and body merged, key removed) → one common event."""
    branch = BranchPayload(payload)
    name = text(pick(payload, "name"), "name")
    if name is None:
        raise MappingError("name", "required: the Branch event name (INSTALL, OPEN, PURCHASE, …)")
    kind = _kind(branch, name)
    event_time = branch.time(None, "timestamp", "event_timestamp")
    if kind in ("install", "reinstall"):
        install_time = event_time
    else:  # install_activity.timestamp, or flat install_activity_timestamp
        install_time = branch.time(INSTALL_ACTIVITY, "timestamp")
    braze_value, braze_field = branch.braze_id()

    return AttributionEvent(
        kind=kind,
        event_name=kind if kind in ("install", "reinstall") else name,
        attributed=_attributed(branch),
        source=branch.text(TOUCH, "~advertising_partner_name", "~channel"),
        source_id=branch.id(TOUCH, "~advertising_partner_id"),
        campaign=branch.text(TOUCH, "~campaign", "~campaign_id"),
        campaign_id=branch.id(TOUCH, "~campaign_id"),
        adgroup=branch.text(TOUCH, "~ad_set_name", "~ad_set_id"),
        adgroup_id=branch.id(TOUCH, "~ad_set_id"),
        ad=branch.text(TOUCH, "~creative_name", "~ad_name", "~creative_id", "~ad_id"),
        ad_id=branch.id(TOUCH, "~creative_id", "~ad_id"),
        event_time=event_time,
        install_time=install_time,
        touch_time=branch.time(None, "last_attributed_touch_timestamp"),
        platform=_platform(branch),
        idfa=branch.id(USER, "idfa"),
        idfv=branch.id(USER, "idfv"),
        google_ad_id=branch.id(USER, "aaid"),
        android_id=branch.id(USER, "android_id"),
        braze_id=device_id(braze_value, braze_field),
        external_id=branch.id(USER, "developer_identity"),
        revenue=number(*branch.first(EVENT_DATA, ("revenue",))),
        currency=branch.text(EVENT_DATA, "currency"),
        country=branch.text(USER, "geo_country_code", "country"),
        # Branch's event id is the same on every delivery of an event; without one the core
        # hashes the whole payload (a retry re-sends the same body).
        dedupe_key=text(pick(payload, "id"), "id") or "",
    )


def _kind(branch: BranchPayload, name: str) -> EventKind:
    kind = KINDS.get(name.casefold(), "event")
    if kind == "install" and flag(*branch.first(CUSTOM, ("reinstall",))):
        return "reinstall"
    return kind


def _attributed(branch: BranchPayload) -> bool:
    """Organic: no touch data at all, or Branch's own ``attributed`` flag false.

    Channel or campaign names are never matched against "organic": Branch channels such as
    "Facebook Organic" or "Organic Search" are real, attributed touches.
    """
    if not branch.has_touch():
        return False
    return flag(pick(branch.payload, "attributed"), "attributed") is not False


def _platform(branch: BranchPayload) -> str | None:
    """``user_data.os`` (IOS, ANDROID, …); else the app platform (IOS_APP → ios)."""
    os_name = branch.text(USER, "os")
    if os_name is not None:
        return os_name
    platform = branch.text(USER, "platform")
    if platform is not None and platform.upper().endswith("_APP"):
        return platform[: -len("_APP")]
    return None


def flat_name(obj: str, key: str) -> str:
    """Branch's log-level name of a nested key: ``user_data`` + ``$braze_install_id`` →
    ``user_data_dollar_braze_install_id``."""
    for sign, word in _FLAT_PREFIXES:
        if key.startswith(sign):
            key = word + key[len(sign) :]
            break
    return f"{obj}_{key}"


def _paths(obj: str | None, keys: Iterable[str]) -> list[str]:
    """Where each of ``keys`` of object ``obj`` may be, in order: nested (``user_data.idfa``),
    then flat (``user_data_idfa``); at the top level when ``obj`` is None."""
    if obj is None:
        return list(keys)
    return [path for key in keys for path in (f"{obj}.{key}", flat_name(obj, key))]


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, Mapping | list | tuple):
        return any(_present(v) for v in (value.values() if isinstance(value, Mapping) else value))
    return True
