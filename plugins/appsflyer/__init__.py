"""AppsFlyer: Push API messages for installs, reinstalls, re-engagements and in-app events."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gateway import PartnerSpec, hookimpl
from plugins.appsflyer.mapping import map_postback


@hookimpl
def register_partners(register: Callable[[PartnerSpec], None]) -> None:
    register(
        PartnerSpec(
            name="appsflyer",
            display_name="AppsFlyer",
            map=map_postback,
            # Push API sends POST with a JSON body by default; GET (fields in the query string)
            # is an option of its settings.
            methods=("GET", "POST"),
            docs_url="https://support.appsflyer.com/hc/en-us/articles/207034356",
            samples=str(Path(__file__).parent / "samples"),
        )
    )
