"""Adjust: real-time callbacks for installs, reinstalls, reattributions and in-app events."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gateway import PartnerSpec, hookimpl
from plugins.adjust.mapping import map_postback


@hookimpl
def register_partners(register: Callable[[PartnerSpec], None]) -> None:
    register(
        PartnerSpec(
            name="adjust",
            display_name="Adjust",
            map=map_postback,
            # Adjust's callbacks are GET requests with the placeholders in the query string;
            # POST stays open for integrated-network callbacks and for replays with a body.
            methods=("GET", "POST"),
            docs_url="https://help.adjust.com/en/article/server-callbacks",
            samples=str(Path(__file__).parent / "samples"),
        )
    )
