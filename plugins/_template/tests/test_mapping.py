"""Example Partner: its mapping rules, and the conformance kit over the partner as it is."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway import MappingError
from gateway.conformance import CHECKS
from gateway.plugins import load_partners
from plugins._template.mapping import map_postback

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def sample(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SAMPLES / name).read_text(encoding="utf-8"))
    return data


def test_attributed_install() -> None:
    event = map_postback(sample("install_attributed.json"))
    assert (event.kind, event.event_name, event.attributed) == ("install", "install", True)
    assert (event.source, event.campaign, event.adgroup, event.ad) == (
        "Fake Network",
        "FAKE_spring",
        "FAKE_group_A",
        "FAKE_banner_red",
    )
    assert event.install_time == datetime(2030, 1, 2, 3, 5, 6, 789000, tzinfo=UTC)
    assert event.braze_id == "fake-braze-device-0001"
    assert event.dedupe_key == "fake-evt-0001"


def test_organic_install() -> None:
    event = map_postback(sample("install_organic.json"))
    assert event.attributed is False
    assert event.idfa is None  # all zeros
    assert event.install_time == datetime(2030, 1, 2, 4, 5, tzinfo=UTC)


def test_in_app_event_keeps_its_name_and_revenue() -> None:
    payload = {"event": "purchase", "network": "Fake Network", "revenue": "4.99"}
    event = map_postback(payload)
    assert (event.kind, event.event_name, event.revenue) == ("event", "purchase", Decimal("4.99"))


def test_missing_event_name_names_the_field() -> None:
    with pytest.raises(MappingError) as err:
        map_postback({"network": "Fake Network"})
    assert err.value.field == "event"


@pytest.mark.parametrize("promise", sorted(CHECKS))
def test_conformance(promise: str) -> None:
    [partner] = load_partners(builtins=("plugins._template",), allow=()).values()
    CHECKS[promise](partner)
