"""`gateway new-partner zprobe` on a clean clone creates a partner that, enabled in config, accepts
its own sample postback end to end through HTTP and passes the conformance kit, without editing a
line.

The clean clone is a copy of ``gateway/``, ``plugins/`` and ``config/`` in a temporary folder;
every command runs there as a subprocess (``cwd`` and ``PYTHONPATH`` the clone), so the new
partner lands in the copy's ``plugins/`` and this checkout is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from gateway.plugins import load_partners
from tests.fixtures import ADMIN_TOKEN, ROOT, LiveGateway, start_gateway, stop_gateway

_NOT_IN_THE_CLONE = {"__pycache__", ".pytest_cache", "data"}


Completed = subprocess.CompletedProcess[str]


class Clone(msgspec.Struct):
    path: Path
    env: dict[str, str]

    def run(self, *args: str, env: dict[str, str] | None = None) -> Completed:
        """``python -m gateway ARGS`` in the clone."""
        return self.python("gateway", *args, env=env)

    def python(self, module: str, *args: str, env: dict[str, str] | None = None) -> Completed:
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=self.path,
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def files(self) -> dict[str, bytes]:
        """Every file of the clone (not caches, not the gateway's data) with its contents."""
        return {
            str(p.relative_to(self.path)): p.read_bytes()
            for p in sorted(self.path.rglob("*"))
            if p.is_file()
            and not _NOT_IN_THE_CLONE.intersection(p.relative_to(self.path).parts)
            and p.name != "gateway.log"
        }


def plugin_rows(stdout: str) -> dict[str, list[str]]:
    """`gateway plugins` output: partner name -> [enabled, methods, source, version]."""
    lines = stdout.strip().splitlines()
    assert lines[0].split() == ["partner", "enabled", "methods", "source", "version"], stdout
    return {line.split()[0]: line.split()[1:] for line in lines[1:]}


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Clone:
    """The committed files of gateway/, plugins/ and config/, as a clean clone has them."""
    path = tmp_path_factory.mktemp("scaffold") / "clone"
    tracked = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "gateway", "plugins", "config"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, tracked.split("\0")):
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / rel, path / rel)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONPATH"] = str(path)
    return Clone(path, env)


@pytest.fixture(scope="module")
def checkout_before() -> tuple[bool, bytes]:
    return (ROOT / "plugins" / "zprobe").exists(), (ROOT / "config" / "gateway.toml").read_bytes()


@pytest.fixture(scope="module")
def zprobe(clone: Clone, checkout_before: tuple[bool, bytes]) -> Completed:
    """`gateway new-partner zprobe --enable`, run once in the clone."""
    return clone.run("new-partner", "zprobe", "--enable")


@pytest.fixture(scope="module")
def zprobe_gateway(clone: Clone, zprobe: Completed) -> Iterator[LiveGateway]:
    """A real `gateway serve` started in the clone (its cwd, code and config file)."""
    assert zprobe.returncode == 0, zprobe.stderr
    gateway = start_gateway(
        clone.path,
        extra_env={
            "PYTHONPATH": str(clone.path),
            "GATEWAY_CONFIG": str(clone.path / "config" / "gateway.toml"),
        },
    )
    yield gateway
    stop_gateway(gateway)


# -- rendering -----------------------------------------------------------------------------------


def test_new_partner_renders_into_the_clone_only(
    clone: Clone, zprobe: Completed, checkout_before: tuple[bool, bytes]
) -> None:
    assert zprobe.returncode == 0, zprobe.stderr
    folder = clone.path / "plugins" / "zprobe"
    assert (
        f"Created partner 'zprobe' in {folder}." in zprobe.stdout
    )  # `import plugins` was the copy
    for name in ("__init__.py", "mapping.py", "README.md"):
        assert (folder / name).is_file(), name
    for name in ("samples", "tests"):
        assert (folder / name).is_dir(), name
    assert {p.name for p in (folder / "samples").iterdir()} >= {
        "event_purchase.query",
        "install_attributed.json",
        "install_organic.json",
    }
    assert (folder / "tests" / "test_mapping.py").is_file()
    # The template stays, and this checkout is untouched.
    assert (clone.path / "plugins" / "_template" / "__init__.py").is_file()
    assert not checkout_before[0], "the checkout has a plugins/zprobe of its own"
    assert not (ROOT / "plugins" / "zprobe").exists()
    assert (ROOT / "config" / "gateway.toml").read_bytes() == checkout_before[1]


def test_rendered_partner_has_no_template_names_left(clone: Clone, zprobe: Completed) -> None:
    assert zprobe.returncode == 0, zprobe.stderr
    folder = clone.path / "plugins" / "zprobe"
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) >= 8
    for path in files:
        rel = str(path.relative_to(folder))
        text = path.read_text(encoding="utf-8")
        for where in (rel, text):
            assert "example" not in where.lower(), rel
            assert "Example Partner" not in where, rel
            assert "_template" not in where, rel
    init = (folder / "__init__.py").read_text(encoding="utf-8")
    assert 'name="zprobe"' in init and 'display_name="Zprobe"' in init
    assert "from plugins.zprobe.mapping import map_postback" in init


def test_enable_adds_the_partner_to_the_config_file(clone: Clone, zprobe: Completed) -> None:
    assert zprobe.returncode == 0, zprobe.stderr
    config = tomllib.loads((clone.path / "config" / "gateway.toml").read_text(encoding="utf-8"))
    assert config["partners"]["zprobe"] == {"enabled": True}
    assert config["partners"]["kochava"] == {"enabled": True}
    assert "Enabled it in config/gateway.toml." in zprobe.stdout


def test_new_partner_refuses_an_existing_folder(clone: Clone, zprobe: Completed) -> None:
    assert zprobe.returncode == 0, zprobe.stderr
    before = clone.files()
    again = clone.run("new-partner", "zprobe", "--enable")
    assert again.returncode == 2
    assert f"{clone.path / 'plugins' / 'zprobe'} already exists" in again.stderr
    assert "Traceback" not in again.stderr
    assert clone.files() == before  # the config file is not enabled twice either


# -- the new partner, loaded ---------------------------------------------------------------------


def test_plugins_lists_it_as_built_in_and_enabled(clone: Clone, zprobe: Completed) -> None:
    assert zprobe.returncode == 0, zprobe.stderr
    done = clone.run("plugins")
    assert done.returncode == 0, done.stderr
    rows = plugin_rows(done.stdout)
    assert rows["zprobe"][:3] == ["yes", "GET,POST", "built-in"]
    assert rows["kochava"][:3] == ["yes", "GET,POST", "built-in"]
    assert "example" not in rows  # the template is no partner


def test_it_passes_the_conformance_kit(clone: Clone, zprobe: Completed) -> None:
    assert zprobe.returncode == 0, zprobe.stderr
    done = clone.run("conformance", "zprobe")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "all promises kept"
    assert "ok   zprobe http_round_trip" in done.stdout
    assert "FAIL" not in done.stdout


def test_its_own_tests_pass(clone: Clone, zprobe: Completed) -> None:
    assert zprobe.returncode == 0, zprobe.stderr
    done = clone.python("pytest", "-q", "-p", "no:cacheprovider", "plugins/zprobe")
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout and "failed" not in done.stdout
    assert "skipped" not in done.stdout


def test_its_samples_go_end_to_end_through_http(clone: Clone, zprobe_gateway: LiveGateway) -> None:
    keys = clone.run("keys", "create", "zprobe", env=zprobe_gateway.env)
    assert keys.returncode == 0, keys.stderr
    assert "note:" not in keys.stderr  # enabled in config
    key = keys.stdout.strip().splitlines()[-1]
    samples = clone.path / "plugins" / "zprobe" / "samples"
    url = f"{zprobe_gateway.base_url}/partners/zprobe/postback"

    def post(name: str) -> httpx.Response:
        body = (samples / name).read_bytes()
        return httpx.post(url, params={"api_key": key}, content=body, timeout=10)

    first = post("install_attributed.json")
    assert (first.status_code, first.json()["status"]) == (202, "accepted"), first.text
    retry = post("install_attributed.json")
    assert (retry.status_code, retry.json()["status"]) == (200, "duplicate"), retry.text

    query = (samples / "event_purchase.query").read_text(encoding="utf-8").strip()
    purchase = httpx.get(f"{url}?{query}&api_key={key}", timeout=10)
    assert (purchase.status_code, purchase.json()["status"]) == (202, "accepted"), purchase.text

    organic = post("install_organic.json")
    assert (organic.status_code, organic.json()["status"]) == (200, "ignored"), organic.text

    listing = httpx.get(
        f"{zprobe_gateway.base_url}/events",
        params={"partner": "zprobe"},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=10,
    )
    assert listing.status_code == 200, listing.text
    events: list[dict[str, Any]] = json.loads(listing.text, parse_float=Decimal)["events"]
    by_key = {e["dedupe_key"]: e for e in events}
    assert sorted(by_key) == ["fake-evt-0001", "fake-evt-0003"]  # one install, one purchase
    install, bought = by_key["fake-evt-0001"], by_key["fake-evt-0003"]
    for event in (install, bought):
        assert event["partner"] == "zprobe"
        assert event["attributed"] is True
        assert (event["source"], event["campaign"]) == ("Fake Network", "FAKE_spring")
    assert (install["kind"], install["event_name"]) == ("install", "install")
    assert install["platform"] == "ios"
    assert install["idfa"] == "00000000-0000-4000-8000-0000000000a1"
    assert install["revenue"] is None
    assert (bought["kind"], bought["event_name"]) == ("event", "purchase")
    assert (bought["revenue"], bought["currency"]) == (Decimal("4.99"), "USD")
    assert bought["ad"] == "FAKE_banner_red"


# -- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["Bad Name", "../x", "", "zed\n", "_zed", "a" * 64, "1abc", "9-lives"], ids=repr
)
def test_bad_names_are_refused_and_create_nothing(clone: Clone, name: str) -> None:
    before, beside = clone.files(), sorted(clone.path.parent.iterdir())
    done = clone.run("new-partner", name, "--enable")
    assert done.returncode == 2
    assert f"invalid partner name {name!r}" in done.stderr
    assert "lower case letters, digits" in done.stderr or "must start with a letter" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert clone.files() == before  # no folder, no config change
    assert sorted(clone.path.parent.iterdir()) == beside


def test_hyphenated_name_renders_to_an_importable_package(clone: Clone) -> None:
    done = clone.run("new-partner", "zprobe-ads")
    assert done.returncode == 0, done.stderr
    folder = clone.path / "plugins" / "zprobe_ads"
    assert (folder / "__init__.py").is_file()
    assert not (clone.path / "plugins" / "zprobe-ads").exists()
    assert not (ROOT / "plugins" / "zprobe_ads").exists()
    init = (folder / "__init__.py").read_text(encoding="utf-8")
    assert 'name="zprobe-ads"' in init and 'display_name="Zprobe Ads"' in init
    assert "from plugins.zprobe_ads.mapping import map_postback" in init
    config = tomllib.loads((clone.path / "config" / "gateway.toml").read_text(encoding="utf-8"))
    assert "zprobe-ads" not in config["partners"]  # no --enable

    listed = plugin_rows(clone.run("plugins").stdout)
    assert listed["zprobe-ads"][:3] == ["no", "GET,POST", "built-in"]
    kit = clone.run("conformance", "zprobe-ads")
    assert kit.returncode == 0, kit.stdout + kit.stderr
    assert kit.stdout.strip().splitlines()[-1] == "all promises kept"
    assert "ok   zprobe-ads http_round_trip" in kit.stdout


def test_the_test_process_never_loaded_the_clone(clone: Clone) -> None:
    partners = load_partners()
    assert "zprobe" not in partners and "zprobe-ads" not in partners
    assert "kochava" in partners
