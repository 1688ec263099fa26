"""Config changes without a restart: a live gateway follows its config file (and SIGHUP)."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.config import Config, ConfigError, parse_config, set_partner_enabled
from gateway.reload import live_part
from tests.fixtures import (
    ROOT,
    LiveGateway,
    kochava_samples,
    make_config,
    new_key,
    start_gateway,
    stop_gateway,
)

INSTALL = json.loads(kochava_samples()["install_ios_attributed.json"])


def install(n: int) -> dict[str, object]:
    return {**INSTALL, "transaction_id": f"reload-{n}"}


@pytest.fixture
def watched(tmp_path: Path) -> tuple[LiveGateway, Path, str]:
    config_file = tmp_path / "gateway.toml"
    shutil.copyfile(ROOT / "config" / "gateway.toml", config_file)
    gateway = start_gateway(tmp_path, {"GATEWAY_CONFIG": str(config_file)})
    key = gateway.create_key("kochava")
    yield gateway, config_file, key
    stop_gateway(gateway)


def test_editing_the_config_file_switches_a_partner_off_without_dropping_a_request(
    watched: tuple[LiveGateway, Path, str],
) -> None:
    gateway, config_file, key = watched
    url = f"{gateway.base_url}/partners/kochava/postback"
    answers: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def send() -> None:
        n = 0
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                n += 1
                try:
                    answers.append(
                        client.post(url, json=install(n), headers={"X-Api-Key": key}).status_code
                    )
                except httpx.HTTPError as exc:  # a dropped connection
                    failures.append(repr(exc))

    sender = threading.Thread(target=send)
    sender.start()
    try:
        time.sleep(1.0)
        before = len(answers)
        set_partner_enabled(config_file, "kochava", False)
        deadline = time.monotonic() + 10
        while 403 not in answers[before:] and time.monotonic() < deadline:
            time.sleep(0.05)
        switched_at = len(answers)
        time.sleep(1.0)
    finally:
        stop.set()
        sender.join(timeout=30)

    assert not failures, failures
    assert before > 0 and answers[:before] == [202] * before
    assert 403 in answers[before:], "the partner was never switched off"
    first_403 = answers.index(403)
    assert set(answers[:first_403]) == {202}, "only accepted postbacks before the switch"
    assert set(answers[first_403:]) == {403}, "only 403 after it, never a 5xx"
    assert len(answers) > switched_at, "postbacks went on after the switch"

    set_partner_enabled(config_file, "kochava", True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = httpx.post(url, json=install(10**6), headers={"X-Api-Key": key})
        if r.status_code != 403:
            break
        time.sleep(0.1)
    assert r.status_code == 202, r.text


def test_an_invalid_config_file_is_refused_and_the_running_config_kept(
    watched: tuple[LiveGateway, Path, str],
) -> None:
    gateway, config_file, key = watched
    url = f"{gateway.base_url}/partners/kochava/postback"
    good = config_file.read_text()
    config_file.write_text(
        good.replace("[partners.kochava]\nenabled = true", "[partners.kochava]\nenabled = maybe")
    )
    deadline = time.monotonic() + 10
    while "keeping the running config" not in gateway.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "keeping the running config" in gateway.log_text()
    assert "not valid TOML" in gateway.log_text()
    r = httpx.post(url, json=install(1), headers={"X-Api-Key": key})
    assert r.status_code == 202, r.text


def test_sighup_rereads_the_config_at_once(watched: tuple[LiveGateway, Path, str]) -> None:
    gateway, config_file, key = watched
    url = f"{gateway.base_url}/partners/kochava/postback"
    set_partner_enabled(config_file, "kochava", False)
    gateway.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        r = httpx.post(url, json=install(2), headers={"X-Api-Key": key})
        if r.status_code == 403:
            break
        time.sleep(0.05)
    assert r.status_code == 403
    assert r.json()["reason"] == "partner 'kochava' is disabled in config"
    assert gateway.process.poll() is None, "SIGHUP must not stop the gateway"


def test_restart_only_settings_are_kept_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    running = make_config(tmp_path)
    new = make_config(tmp_path / "other", kochava=False)
    new.limits.max_batch_events = 7
    new.restricted_networks = ["Acme"]
    merged = live_part(running, new)
    assert merged.storage.url == running.storage.url
    assert merged.data_dir == running.data_dir
    assert not merged.partner_enabled("kochava")
    assert merged.limits.max_batch_events == 7
    assert merged.restricted_networks == ["Acme"]
    assert "storage.url changed; it takes effect after a restart" in caplog.text


def test_in_process_watch_and_toggle(tmp_path: Path) -> None:
    config_file = tmp_path / "gateway.toml"
    shutil.copyfile(ROOT / "config" / "gateway.toml", config_file)
    config = make_config(tmp_path / "data")
    key = new_key(config)
    with TestClient(create_app(config, config_file=config_file)) as client:
        gw = client.app.state.gateway
        gw.set_partner_enabled("kochava", False)
        r = client.post(f"/partners/kochava/postback?api_key={key}", json=install(3))
        assert r.status_code == 403
        gw.set_partner_enabled("kochava", True)
        r = client.post(f"/partners/kochava/postback?api_key={key}", json=install(3))
        assert r.status_code == 202
    assert parse_config(config_file).partner_enabled("kochava")


def test_set_partner_enabled_keeps_comments_and_other_partners(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    shutil.copyfile(ROOT / "config" / "gateway.toml", path)
    set_partner_enabled(path, "tune", False)
    set_partner_enabled(path, "acme", True)
    text = path.read_text()
    assert "# Embedded defaults" in text
    config = parse_config(path)
    assert not config.partner_enabled("tune")
    assert config.partner_enabled("acme") and config.partner_enabled("kochava")
    assert config == Config(partners={**config.partners})  # nothing else changed


def test_set_partner_enabled_never_writes_an_invalid_file(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text("[limits]\nmax_body_bytes = 0\n")
    with pytest.raises(ConfigError):
        set_partner_enabled(path, "kochava", True)
    assert path.read_text() == "[limits]\nmax_body_bytes = 0\n"


def test_toggle_handles_comments_crlf_modes_and_symlinks(tmp_path: Path) -> None:
    real = tmp_path / "real.toml"
    real.write_bytes(b"[partners.kochava]   # the main partner\r\nenabled = true  # on\r\n")
    real.chmod(0o640)
    link = tmp_path / "gateway.toml"
    link.symlink_to(real)
    set_partner_enabled(link, "kochava", False)
    assert link.is_symlink()
    assert (
        real.read_bytes() == b"[partners.kochava]   # the main partner\r\nenabled = false  # on\r\n"
    )
    assert real.stat().st_mode & 0o777 == 0o640
    assert not parse_config(link).partner_enabled("kochava")


@pytest.mark.parametrize(
    "text",
    ["partners.kochava.enabled = true\n", "[partners]\nkochava = { enabled = true }\n"],
    ids=["dotted keys", "inline table"],
)
def test_toggle_refuses_layouts_it_cannot_edit_saying_so(tmp_path: Path, text: str) -> None:
    path = tmp_path / "g.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="layout this cannot edit"):
        set_partner_enabled(path, "kochava", False)
    assert path.read_text() == text


def test_a_reload_naming_a_partner_without_a_plugin_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config_file = tmp_path / "gateway.toml"
    shutil.copyfile(ROOT / "config" / "gateway.toml", config_file)
    config = make_config(tmp_path / "data")
    with TestClient(create_app(config, config_file=config_file)) as client:
        set_partner_enabled(config_file, "kochavaa", True)
        client.app.state.gateway.config_watcher.check()
    assert "config names partner 'kochavaa' but no plugin provides it" in caplog.text
