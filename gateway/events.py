"""The common attribution event every partner's postback becomes (DESIGN.md §4)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import msgspec

EventKind = Literal["install", "reinstall", "reengagement", "event"]

#: Kinds that count as an install for the partner's connection status.
INSTALL_KINDS: frozenset[str] = frozenset({"install", "reinstall"})

#: Device and user identifier fields; the core normalises all of them the same way.
ID_FIELDS: tuple[str, ...] = (
    "idfa",
    "idfv",
    "google_ad_id",
    "android_id",
    "windows_ad_id",
    "braze_id",
    "external_id",
    "partner_device_id",
    "source_id",
    "campaign_id",
    "adgroup_id",
    "ad_id",
)

#: The ids of a device (not of a user): what ``[retention] device_ids_days`` removes.
DEVICE_ID_FIELDS: tuple[str, ...] = (
    "idfa",
    "idfv",
    "google_ad_id",
    "android_id",
    "windows_ad_id",
    "partner_device_id",
)

#: Free-text fields: stripped, empty becomes null, otherwise kept exactly.
TEXT_FIELDS: tuple[str, ...] = ("event_name", "source", "campaign", "adgroup", "ad", "app_id")

#: Time fields: timezone-aware UTC once the core has normalised the event.
TIME_FIELDS: tuple[str, ...] = ("event_time", "install_time", "touch_time", "received_at")


class AttributionEvent(msgspec.Struct, kw_only=True):
    """One attributed (or organic) install, re-engagement or in-app event.

    A partner plugin fills the attribution and device fields. The core fills ``partner``,
    ``event_id``, ``received_at``, ``raw`` and, when the plugin leaves it empty, ``dedupe_key``.
    """

    kind: EventKind
    attributed: bool
    event_name: str = ""

    source: str | None = None
    campaign: str | None = None
    adgroup: str | None = None
    ad: str | None = None
    source_id: str | None = None
    campaign_id: str | None = None
    adgroup_id: str | None = None
    ad_id: str | None = None

    event_time: datetime | None = None
    install_time: datetime | None = None
    touch_time: datetime | None = None

    platform: str | None = None
    app_id: str | None = None

    idfa: str | None = None
    idfv: str | None = None
    google_ad_id: str | None = None
    android_id: str | None = None
    windows_ad_id: str | None = None
    braze_id: str | None = None
    external_id: str | None = None
    partner_device_id: str | None = None

    revenue: Decimal | None = None
    currency: str | None = None
    country: str | None = None

    dedupe_key: str = ""

    # Filled by the core.
    partner: str = ""
    event_id: str = ""
    received_at: datetime | None = None
    raw: dict[str, Any] = msgspec.field(default_factory=dict)


def _enc_hook(obj: Any) -> Any:
    """Subclasses of datetime (freezegun's FakeDatetime, pendulum, …) that msgspec refuses:
    encoded as msgspec encodes a datetime (RFC 3339, ``Z`` for UTC)."""
    if isinstance(obj, datetime):
        text = obj.isoformat()
        return text[:-6] + "Z" if text.endswith("+00:00") else text
    raise NotImplementedError(f"cannot encode objects of type {type(obj).__name__}")


# Revenue goes out as a JSON number, not a string.
event_encoder = msgspec.json.Encoder(decimal_format="number", enc_hook=_enc_hook)
event_decoder = msgspec.json.Decoder(AttributionEvent)
