"""TUNE (Attribution Analytics, formerly MobileAppTracking): GET postbacks for installs,
re-engagements and in-app events. The mapping is in mapping.py, the table in README.md."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gateway import PartnerSpec, hookimpl
from plugins.tune.mapping import map_postback


@hookimpl
def register_partners(register: Callable[[PartnerSpec], None]) -> None:
    register(
        PartnerSpec(
            name="tune",
            display_name="TUNE",
            map=map_postback,
            # TUNE renders its macros into a postback URL and requests it with GET.
            methods=("GET",),
            docs_url="https://help.tune.com/marketing-console/macros-in-postback-urls/",
            samples=str(Path(__file__).parent / "samples"),
        )
    )
