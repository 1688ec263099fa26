"""The CLI against a real gateway process and its storage."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import httpx

from tests.fixtures import LiveGateway, kochava_samples

SAMPLE = kochava_samples()["install_ios_attributed.json"]


def test_keys_create_prints_the_key_last_and_stores_only_its_hash(
    live_gateway: LiveGateway, tmp_path: Path
) -> None:
    done = live_gateway.cli("keys", "create", "kochava")
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip().splitlines()[-1]
    assert key.startswith("gwk_") and len(key) > 40
    assert "shown only this once" in done.stdout
    for db in (tmp_path / "data").glob("*.db*"):
        assert key.encode() not in db.read_bytes()
    url = f"{live_gateway.base_url}/partners/kochava/postback?api_key={key}"
    r = httpx.post(url, content=SAMPLE)
    assert r.status_code == 202


def test_keys_list_masks_and_revoke_refuses_the_key(live_gateway: LiveGateway) -> None:
    key = live_gateway.create_key()
    listing = live_gateway.cli("keys", "list", "kochava")
    assert listing.returncode == 0
    assert key not in listing.stdout
    assert key[-4:] in listing.stdout and "active" in listing.stdout
    key_id = listing.stdout.split("(")[1].split(")")[0]

    assert live_gateway.cli("keys", "revoke", key_id).returncode == 0
    assert "revoked" in live_gateway.cli("keys", "list").stdout
    r = httpx.post(f"{live_gateway.base_url}/partners/kochava/postback", content=SAMPLE,
                   headers={"X-Api-Key": key})  # fmt: skip
    assert r.status_code == 401
    again = live_gateway.cli("keys", "revoke", key_id)
    assert again.returncode == 1 and "no active key" in again.stderr


def test_keys_list_shows_when_each_key_was_last_used(live_gateway: LiveGateway) -> None:
    used, unused = live_gateway.create_key(), live_gateway.create_key()
    before = live_gateway.cli("keys", "list", "kochava").stdout
    assert before.count("never") == 2
    url = f"{live_gateway.base_url}/partners/kochava/postback"
    assert httpx.post(url, content=SAMPLE, headers={"X-Api-Key": used}).status_code == 202
    lines = live_gateway.cli("keys", "list", "kochava").stdout.splitlines()
    [used_line] = [line for line in lines if used[-4:] in line]
    [unused_line] = [line for line in lines if unused[-4:] in line]
    assert "never" not in used_line and "never" in unused_line
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert used_line.count(today) == 2  # created and last used


def test_keys_create_for_an_unknown_partner_fails(live_gateway: LiveGateway) -> None:
    done = live_gateway.cli("keys", "create", "nosuch")
    assert done.returncode == 2
    assert "unknown partner 'nosuch'" in done.stderr


def test_bad_config_is_reported_not_a_traceback(live_gateway: LiveGateway, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nmax_body_bytes = 0\n")
    done = live_gateway.cli("--config", str(bad), "status")
    assert done.returncode == 2
    assert "max_body_bytes" in done.stderr and "Traceback" not in done.stderr


def test_server_log_has_no_key_and_no_query_string(live_gateway: LiveGateway) -> None:
    key = live_gateway.create_key()
    url = f"{live_gateway.base_url}/partners/kochava/postback?api_key={key}&campaign_name=secretq"
    assert httpx.post(url, content=SAMPLE).status_code == 202
    assert httpx.post(url.replace(key, "wrong-key"), content=SAMPLE).status_code == 401
    log = live_gateway.log_text()
    assert '"msg": "postback"' in log
    assert key not in log and "wrong-key" not in log and "secretq" not in log
    assert "api_key" not in log
