"""Example Partner: registers the partner with the gateway; the mapping is in mapping.py."""

# template-only: this is the partner plugin to copy; `gateway new-partner NAME` renders it.

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gateway import PartnerSpec, hookimpl
from plugins._template.mapping import map_postback


@hookimpl
def register_partners(register: Callable[[PartnerSpec], None]) -> None:
    register(
        PartnerSpec(
            name="example",  # the URL segment and the config key: /partners/example/postback
            display_name="Example Partner",
            map=map_postback,
            # The HTTP methods the partner's postbacks use. Most send POST (a JSON body);
            # macro-style partners send GET with everything in the query string.
            methods=("GET", "POST"),
            docs_url="",  # the partner's postback documentation, for operators
            # Sample postbacks: *.json bodies (POST), *.query query strings (GET). A file whose
            # name contains "organic" must map to an organic event. The conformance kit uses them.
            samples=str(Path(__file__).parent / "samples"),
        )
    )
