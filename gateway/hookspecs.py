"""The partner plugin contract.

A partner plugin is a module (or object) with functions marked ``@hookimpl`` whose names match the
hook specifications below. The markers are created here, once; plugins import ``hookimpl`` from
``gateway``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec
import pluggy

from gateway.events import AttributionEvent

PROJECT = "gateway"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: What a partner's mapping returns: one event, or several for a payload that holds several.
MapResult = AttributionEvent | Sequence[AttributionEvent]
#: A partner's mapping: the payload (query string and body merged, key removed) to events.
MapFn = Callable[[Mapping[str, Any]], MapResult]


class PartnerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What the gateway needs to know about one partner.

    ``name`` is the URL segment (``/partners/<name>/postback``) and the config key; lower case
    letters, digits, ``-`` and ``_``. ``map`` turns a payload into events and raises
    :class:`gateway.errors.MappingError` for unusable input. ``methods`` are the HTTP methods the
    partner sends postbacks with. ``samples`` is the folder of the partner's sample postbacks
    (``*.json`` bodies sent by POST, ``*.query`` query strings sent by GET; a file whose name
    contains ``organic`` must map to an organic event): the conformance kit runs on them.
    """

    name: str
    map: MapFn
    display_name: str = ""
    methods: tuple[str, ...] = ("GET", "POST")
    docs_url: str = ""
    samples: str = ""


@hookspec
def register_partners(register: Callable[[PartnerSpec], None]) -> None:
    """Register the partners this plugin provides.

    Call ``register(PartnerSpec(name=..., map=...))`` once per partner. Called once when the
    gateway loads its plugins.
    """
