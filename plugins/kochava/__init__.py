"""Kochava: attribution postbacks for installs, re-engagements and in-app events."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gateway import PartnerSpec, hookimpl
from plugins.kochava.mapping import map_postback


@hookimpl
def register_partners(register: Callable[[PartnerSpec], None]) -> None:
    register(
        PartnerSpec(
            name="kochava",
            display_name="Kochava",
            map=map_postback,
            methods=("GET", "POST"),
            docs_url="https://support.kochava.com/",
            samples=str(Path(__file__).parent / "samples"),
        )
    )
