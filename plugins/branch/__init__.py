"""Branch: webhooks in Branch's event ontology for installs, re-engagements and in-app events."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gateway import PartnerSpec, hookimpl
from plugins.branch.mapping import map_postback


@hookimpl
def register_partners(register: Callable[[PartnerSpec], None]) -> None:
    register(
        PartnerSpec(
            name="branch",
            display_name="Branch",
            map=map_postback,
            # Branch webhooks POST the event as JSON by default; a webhook may be set to GET,
            # with the fields templated into the query string.
            methods=("GET", "POST"),
            docs_url="https://help.branch.io/developer-hub/docs/webhooks-for-developers",
            samples=str(Path(__file__).parent / "samples"),
        )
    )
