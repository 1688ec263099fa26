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

import functools
from collections.abc import Mapping
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
    present,
    text,
    timestamp,
)

TOUCH = "last_attributed_touch_data"
USER = "user_data"
EVENT_DATA = "event_data"
CUSTOM = "custom_data"
INSTALL_ACTIVITY = "install_activity"
NESTED = (TOUCH, USER, EVENT_DATA, CUSTOM, INSTALL_ACTIVITY)
TOUCH_FLAT = f"{TOUCH}_"

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
    """One Branch payload with its nested objects decoded. A key of an object is looked up
    nested (``user_data.idfa``, or a field sent under that dotted name), then under its
    log-level name (``user_data_idfa``). A nested or log-level value, or the Braze id, that
    holds only blanks (an empty object) counts as not sent, as in has_touch(), so the next
    place is tried."""

    def __init__(self, payload: Mapping[str, Any]) -> None:
        self.payload = payload
        self.objects = {name: json_object(payload.get(name), name) for name in NESTED}

    def text(self, obj: str, *keys: str) -> str | None:
        value, field = self.first(obj, keys)
        return text(value, field)

    def id(self, obj: str, *keys: str) -> str | None:
        value, field = self.first(obj, keys)
        return device_id(value, field)

    def time(self, obj: str, *keys: str) -> datetime | None:
        value, field = self.first(obj, keys)
        return timestamp(value, field)

    def first(self, obj: str, keys: tuple[str, ...]) -> tuple[Any, str]:
        """The first of ``keys`` present in ``obj``, nested then flat, and the field it came
        from as the partner spells it; the first key's nested field when none is."""
        found = self._find(obj, keys)
        return found if found is not None else (None, f"{obj}.{keys[0]}")

    def braze_id(self) -> tuple[Any, str]:
        """The Braze id and the field it came from: top level first, then each object in
        BRAZE_OBJECTS order, nested or flat."""
        value = self.payload.get(BRAZE_KEY)
        if _usable(value):
            return value, BRAZE_KEY
        for obj in BRAZE_OBJECTS:
            found = self._find(obj, (BRAZE_KEY,))
            if found is not None:
                return found
        return None, BRAZE_KEY

    def has_touch(self) -> bool:
        """Whether any touch data came: a non-blank value in ``last_attributed_touch_data`` or
        in one of its flat ``last_attributed_touch_data_*`` fields."""
        if any(_present(v) for v in self.objects[TOUCH].values()):
            return True
        return any(
            _present(v)
            for k, v in self.payload.items()
            if isinstance(k, str) and k.startswith(TOUCH_FLAT)
        )

    def _find(self, obj: str, keys: tuple[str, ...]) -> tuple[Any, str] | None:
        """As first(), None when none of ``keys`` is present."""
        payload, nested = self.payload, self.objects[obj]
        # Most places are empty: the None checks spare a call for each.
        for key, path, flat in _places(obj, keys):
            value = payload.get(path)  # a nested key sent flat under its dotted path
            if value is not None and present(value):
                return value, path
            value = nested.get(key)
            if value is not None and _usable(value):
                return value, path
            value = payload.get(flat)
            if value is not None and _usable(value):
                return value, flat
        return None


def map_postback(payload: Mapping[str, Any]) -> AttributionEvent:
    """One Branch event (query string and body merged, key removed) → one common event."""
    branch = BranchPayload(payload)
    name = text(pick(payload, "name"), "name")
    if name is None:
        raise MappingError("name", "required: the Branch event name (INSTALL, OPEN, PURCHASE, …)")
    kind = _kind(branch, name)
    event_time = timestamp(*pick_named(payload, "timestamp", "event_timestamp"))
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
        touch_time=timestamp(*pick_named(payload, "last_attributed_touch_timestamp")),
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


@functools.cache  # called with the same few constant key lists on every payload
def _places(obj: str, keys: tuple[str, ...]) -> tuple[tuple[str, str, str], ...]:
    """Where each of ``keys`` of object ``obj`` may be, in order: the key, its nested path
    (``user_data.idfa``) and its flat name (``user_data_idfa``)."""
    return tuple((key, f"{obj}.{key}", flat_name(obj, key)) for key in keys)


def _usable(value: Any) -> bool:
    """Whether a lookup takes ``value``: sent (see _present), and what pick() takes (not an
    unfilled ``{macro}``)."""
    return present(value) if isinstance(value, str) else _present(value)


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, Mapping | list | tuple):
        return any(_present(v) for v in (value.values() if isinstance(value, Mapping) else value))
    return True
