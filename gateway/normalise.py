"""Normalisation rules every partner gets from the core (DESIGN.md §5).

Plugins call these helpers while mapping; the core runs :func:`finalise` on every mapped event so
that the rules hold even where a plugin forgot one. Every helper takes the partner's field name and
raises :class:`~gateway.errors.MappingError` naming it when a value is unusable.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec

from gateway.body import MAX_JSON_DEPTH, nested_deeper_than
from gateway.errors import MappingError
from gateway.events import ID_FIELDS, TEXT_FIELDS, AttributionEvent

_TRUE = frozenset({"true", "1", "yes", "y", "t", "on"})
_FALSE = frozenset({"false", "0", "no", "n", "f", "off"})
# An unfilled partner macro: "{idfa}" or "{{campaign}}" anywhere; for ids also "[idfa]", "%IDFA%"
# (as text, "[Brand]" or "%PROMO%" may be a real campaign name).
_MACRO = re.compile(r"^\{\{?[A-Za-z0-9_.$~-]+\}?\}$")
_ID_MACRO = re.compile(r"^(\[[A-Za-z0-9_.$~-]+\]|%[A-Za-z0-9_]+%)$")
_ZERO_ID = re.compile(r"^[0\-]+$")
_NULL_IDS = frozenset({"null", "none", "nil", "undefined", "(null)", "unknown", "n/a"})
_LONGEST_NULL_ID = max(len(word) for word in _NULL_IDS)
# Possessive (++, *+): a date fails at its first "-" without retrying shorter runs of digits.
_NUMERIC = re.compile(r"^[+-]?(?:\d++(?:\.\d*+)?|\.\d++)(?:[eE][+-]?\d++)?$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Earliest and latest times accepted: anything outside is a unit or data error.
_MIN_TIME = datetime(1990, 1, 1, tzinfo=UTC)
_MAX_TIME = datetime(2200, 1, 1, tzinfo=UTC)
_MAX_TEXT = 4096


def pick(payload: Mapping[str, Any], *paths: str) -> Any:
    """The first value under ``paths`` that is not null, blank or an unfilled ``{macro}``.

    A path may be dotted (``identity_link.braze_id``) to look inside nested objects.
    """
    plain = type(payload) is dict
    for path in paths:
        if plain and "." not in path:  # the common case, without the walk
            value = payload.get(path)
            if value is not None and _present(value):
                return value
            continue
        found = _lookup(payload, path.split("."), loose=False)
        if found is not None:
            return found[0]
    return None


def pick_named(payload: Mapping[str, Any], *paths: str, loose: bool = False) -> tuple[Any, str]:
    """Like :func:`pick`, with the path the value came from, so an error names the field the
    partner actually sent: ``text(*pick_named(p, "campaign_name", "campaign_id"))``; with no
    value, the first path. ``loose`` compares keys at every level without case, ``_`` or ``-``
    (``braze_id``, ``brazeId``, ``Braze-ID``) and returns the path as the partner spelt it."""
    plain = type(payload) is dict
    if loose and plain and (ranks := _loose_ranks(paths)) is not None:
        return _pick_loose(payload, ranks, paths[0])
    for path in paths:
        if plain and not loose and "." not in path:  # as in pick()
            value = payload.get(path)
            if value is not None and _present(value):
                return value, path
            continue
        found = _lookup(payload, path.split("."), loose)
        if found is not None:
            return found
    return None, paths[0]


def _pick_loose(payload: Mapping[Any, Any], ranks: dict[str, int], first: str) -> tuple[Any, str]:
    """A loose :func:`pick_named` of top-level keys in one pass over the payload, folding each
    key once: the earliest path wins, and for one path the earliest key in the payload."""
    best, found = len(ranks), (None, first)
    for key, value in payload.items():
        if not isinstance(key, str):
            continue
        rank = ranks.get(_fold(key))
        if rank is not None and rank < best and value is not None and _present(value):
            best, found = rank, (value, key)
            if rank == 0:
                break
    return found


@functools.lru_cache(maxsize=1024)  # mappings pass the same few lists of paths every time
def _loose_ranks(paths: tuple[str, ...]) -> dict[str, int] | None:
    """Each folded path and the position of its first spelling in ``paths``; None when a path
    is dotted (walked level by level instead)."""
    if any("." in path for path in paths):
        return None
    ranks: dict[str, int] = {}
    for path in paths:
        ranks.setdefault(_fold(path), len(ranks))
    return ranks


def present(value: Any) -> bool:
    """Whether :func:`pick` takes ``value``: not null, blank or an unfilled ``{macro}``."""
    return value is not None and _present(value)


def _present(value: Any) -> bool:
    """Not blank and not an unfilled ``{macro}`` (None is checked by the caller)."""
    if type(value) is not str and not isinstance(value, str):
        return True
    stripped = value.strip()
    return bool(stripped) and not (stripped[0] == "{" and _MACRO.match(stripped))


def _lookup(value: Any, parts: list[str], loose: bool) -> tuple[Any, str] | None:
    """The present value under the keys ``parts`` with its path as sent; None when absent."""
    if not parts:
        return None if value is None or not _present(value) else (value, "")
    if type(value) is not dict and not isinstance(value, Mapping):
        return None
    if len(parts) > 1 and (flat := ".".join(parts)) in value:
        # A flat key that contains dots, as query strings send nested fields.
        found = _lookup(value[flat], [], loose)
        if found is not None:
            return found[0], flat
    part, rest = parts[0], parts[1:]
    if loose:
        folded = _fold(part)
        keys = [k for k in value if isinstance(k, str) and _fold(k) == folded]
    else:
        keys = [part] if part in value else []
    for key in keys:
        found = _lookup(value[key], rest, loose)
        if found is not None:
            return found[0], (f"{key}.{found[1]}" if rest else key)
    return None


@functools.lru_cache(maxsize=4096)  # field names repeat from one postback to the next
def _fold(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def json_object(value: Any, field: str) -> Mapping[str, Any]:
    """A nested object that partners send either as JSON or as JSON text inside a string (GET
    postbacks, AppsFlyer's ``custom_data`` and ``event_value``). Blank is an empty object."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        try:
            value = msgspec.json.decode(value)
        except (msgspec.DecodeError, RecursionError):
            raise MappingError(field, "expected a JSON object") from None
        if nested_deeper_than(value, MAX_JSON_DEPTH):
            raise MappingError(field, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(value, Mapping):
        raise MappingError(field, f"expected a JSON object, got {_kind(value)}")
    return value


def text(value: Any, field: str) -> str | None:
    """A text value, with surrounding white space trimmed; empty and unfilled ``{macros}``
    become None. Numbers become their decimal text (partners send ids both ways). Everything
    else is kept exactly as sent (any script, emoji, brackets)."""
    if value is None:
        return None
    if type(value) is str:  # the common case first
        out = value.strip()
        if not out or (out[0] == "{" and _MACRO.match(out)):
            return None
        if len(out) > _MAX_TEXT:
            raise MappingError(field, f"longer than {_MAX_TEXT} characters")
        if "\x00" in out:
            raise MappingError(field, "contains a NUL character")
        return out
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MappingError(field, "must be a finite number or text")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, Decimal):
        return str(value)
    if not isinstance(value, str):
        raise MappingError(field, f"expected text, got {_kind(value)}")
    out = value.strip()
    if not out or _MACRO.match(out):
        return None
    if len(out) > _MAX_TEXT:
        raise MappingError(field, f"longer than {_MAX_TEXT} characters")
    if "\x00" in out:
        raise MappingError(field, "contains a NUL character")
    return out


def device_id(value: Any, field: str) -> str | None:
    """A device or user id: like :func:`text`, and all-zero ids, null words (``null``,
    ``undefined``, …) and macros in any bracket style become None."""
    out = text(value, field)
    if out is None:
        return None
    first = out[0]  # each pattern below is anchored at a character it starts with
    if first in "0-" and _ZERO_ID.match(out):
        return None
    if first in "[%" and _ID_MACRO.match(out):
        return None
    if len(out) <= _LONGEST_NULL_ID and out.lower() in _NULL_IDS:
        return None
    return out


def flag(value: Any, field: str) -> bool | None:
    """``true/false/1/0/yes/no`` in any case, as bool, number or string; blank and unfilled
    ``{macros}`` are None."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if not word or (word[0] == "{" and _MACRO.match(word)):
            return None
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise MappingError(field, f"expected a true/false flag, got {_show(value)}")


def number(value: Any, field: str) -> Decimal | None:
    """A decimal amount (revenue) from a number or numeric text; blank and unfilled ``{macros}``
    are None."""
    if value is None:
        return None
    if isinstance(value, str):
        raw = value.strip()
        if not raw or (raw[0] == "{" and _MACRO.match(raw)):
            return None
    elif isinstance(value, bool):
        raise MappingError(field, "expected a number, got a boolean")
    elif isinstance(value, int | float | Decimal):
        raw = str(value)
    else:
        raise MappingError(field, f"expected a number, got {_kind(value)}")
    if not _NUMERIC.match(raw):
        raise MappingError(field, f"expected a number, got {_show(value)}")
    try:
        out = Decimal(raw)
    except InvalidOperation:
        raise MappingError(field, f"expected a number, got {_show(value)}") from None
    # adjusted() is the exponent: no arithmetic on huge exponents (which would overflow).
    if not out.is_finite() or (out and out.adjusted() >= 15):
        raise MappingError(field, f"number out of range: {_show(value)}")
    return out


def timestamp(value: Any, field: str) -> datetime | None:
    """A point in time as timezone-aware UTC.

    Accepts ISO-8601 with or without ``T`` and zone (no zone means UTC), ``YYYY-MM-DD
    HH:MM:SS[.fff]``, offsets with or without a colon, and epoch seconds, milliseconds or
    microseconds as number or text (the unit is chosen by magnitude). Blank, and the epoch
    value 0 that partners send for "no time", are None.
    """
    if value is None:
        return None
    if not isinstance(value, str):  # text is the common case, below
        if isinstance(value, bool):
            raise MappingError(field, "expected a time, got a boolean")
        if not isinstance(value, int | float):
            raise MappingError(field, f"expected a time, got {_kind(value)}")
        if value == 0:
            return None
        try:
            seconds = float(value)
        except OverflowError:  # an int too large for a float
            raise MappingError(field, f"time out of range: {_show(value)}") from None
        return _from_epoch(seconds, field, value)
    raw = value.strip()
    if not raw:
        return None
    if raw[0] in "{[%" and (_MACRO.match(raw) or _ID_MACRO.match(raw)):
        return None
    if _NUMERIC.match(raw):
        seconds = float(raw)
        return None if seconds == 0 else _from_epoch(seconds, field, value)
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise MappingError(field, f"unrecognised time format {_show(value)}") from None
    try:
        moment = as_utc(parsed)
    except OverflowError:  # year 1 or 9999 shifted out of range by its offset
        raise MappingError(field, f"time out of range: {_show(value)}") from None
    return _checked(moment, field, value)


def as_utc(moment: datetime) -> datetime:
    """A naive time is taken as UTC; an aware one is converted to UTC."""
    if moment.tzinfo is None:
        if type(moment) is datetime:
            # The same as replace(tzinfo=UTC), fold included, at a fraction of its cost on 3.11.
            return datetime.combine(moment.date(), moment.time(), UTC)
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _from_epoch(seconds: float, field: str, original: Any) -> datetime:
    if not math.isfinite(seconds):
        raise MappingError(field, f"not a valid time: {_show(original)}")
    magnitude = abs(seconds)
    if magnitude >= 1e14:
        seconds /= 1e6  # microseconds
    elif magnitude >= 1e11:
        seconds /= 1e3  # milliseconds
    try:
        moment = _EPOCH + timedelta(seconds=seconds)
    except OverflowError:
        raise MappingError(field, f"time out of range: {_show(original)}") from None
    return _checked(moment, field, original)


def _checked(moment: datetime, field: str, original: Any) -> datetime:
    if not _MIN_TIME <= moment < _MAX_TIME:
        raise MappingError(field, f"time out of range: {_show(original)}")
    return moment


def stable_key(payload: Mapping[str, Any], ignore: Iterable[str] = ()) -> str:
    """A dedupe key for partners that send no event id: a hash of the payload's stable fields.

    ``ignore`` names fields that change between retries of the same postback (retry counters,
    send times); they are left out so a retry hashes the same.
    """
    skip = set(ignore)
    if not skip and type(payload) is dict:
        stable = payload  # nothing to leave out: encode it as it is
    else:
        stable = {k: v for k, v in payload.items() if k not in skip}
    digest = hashlib.sha256(msgspec.json.encode(stable, order="sorted")).hexdigest()
    return "sha256:" + digest


def finalise(event: AttributionEvent) -> AttributionEvent:
    """Apply the core rules to a mapped event, whatever the plugin already did."""
    # Only the values a rule changes are replaced: most arrive already normalised, and each
    # one replaced costs.
    changes: dict[str, Any] = {}
    for name in ID_FIELDS:
        value = getattr(event, name)
        if value is not None and (out := device_id(value, name)) is not value:
            changes[name] = out
    for name in TEXT_FIELDS:
        value = getattr(event, name)
        if value is not None and (out := text(value, name)) is not value:
            changes[name] = out
    for name in ("event_time", "install_time", "touch_time"):
        value = getattr(event, name)
        if value is not None and (moment := as_utc(value)) is not value:
            changes[name] = moment
    if event.platform is not None:
        changes["platform"] = _lower(text(event.platform, "platform"))
    if event.currency is not None:
        changes["currency"] = _upper(text(event.currency, "currency"))
    if event.country is not None:
        changes["country"] = _upper(text(event.country, "country"))
    if not (changes.get("event_name", event.event_name)):
        changes["event_name"] = event.kind
    return msgspec.structs.replace(event, **changes)


def _lower(value: str | None) -> str | None:
    return value.lower() if value is not None else None


def _upper(value: str | None) -> str | None:
    return value.upper() if value is not None else None


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


def _show(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."
