"""Singular: attribution postbacks for installs, re-engagements and in-app events.

Singular sends internal BI postbacks as JSON by POST, and partner-style postbacks built from its
macros by GET; mapping.py maps both. The mapping table is in README.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gateway import PartnerSpec, hookimpl
from plugins.singular.mapping import map_postback


@hookimpl
def register_partners(register: Callable[[PartnerSpec], None]) -> None:
    register(
        PartnerSpec(
            name="singular",
            display_name="Singular",
            map=map_postback,
            methods=("GET", "POST"),
            docs_url=(
                "https://support.singular.net/hc/en-us/articles/"
                "360038040791-Configuring-Internal-BI-Postbacks"
            ),
            samples=str(Path(__file__).parent / "samples"),
        )
    )
