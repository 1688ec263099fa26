"""A throwaway third-party partner package, built and installed into a private folder, is routed
at /partners/<its name>/postback, listed by `gateway plugins` and checked by `gateway conformance`
when GATEWAY_PLUGINS names it, and left out when the allow-list does not; a package whose hook is
misspelt stops the gateway, named, only when allowed.

The packages are installed with ``pip install --target`` into temporary folders that only the
subprocesses see (through PYTHONPATH); this test process and the virtualenv never do.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import httpx
import msgspec
import pytest

from gateway.plugins import ENTRY_POINT_GROUP, load_partners
from tests.fixtures import ADMIN_TOKEN, LiveGateway, free_port, start_gateway, stop_gateway

NAME = "zeta-ads"
TYPO = "typo-ads"
Completed = subprocess.CompletedProcess[str]


class Packages(msgspec.Struct):
    root: Path
    rendered: Completed  # `gateway new-partner zeta-ads --external ext`
    project: Path  # ext/gateway-zeta-ads
    site: Path  # gateway-zeta-ads installed here
    typo_site: Path  # gateway-typo-ads (register_partner, misspelt) installed here
    config: Path  # enables kochava and zeta-ads

    def pythonpath(self) -> str:
        return os.pathsep.join((str(self.site), str(self.typo_site)))

    def env(self, allow: str | None) -> dict[str, str]:
        """The environment without GATEWAY_*, both packages importable, GATEWAY_PLUGINS=allow."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update({"PYTHONPATH": self.pythonpath(), "GATEWAY_CONFIG": str(self.config)})
        if allow is not None:
            env["GATEWAY_PLUGINS"] = allow
        return env


def run(*args: str, env: dict[str, str], cwd: Path, timeout: float = 120) -> Completed:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def pip_install(project: Path, target: Path, cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "PIP_"))}
    done = run(
        *("-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index"),
        *("--no-cache-dir", "--disable-pip-version-check", "--quiet"),
        *("--target", str(target), str(project)),
        env=env,
        cwd=cwd,
    )
    assert done.returncode == 0, done.stdout + done.stderr


NOT_LOADED = "installed, not loaded: add it to GATEWAY_PLUGINS to load it"


def plugin_rows(stdout: str) -> dict[str, list[str]]:
    """`gateway plugins` output: loaded partner name -> [enabled, methods, source, version]."""
    lines = stdout.strip().splitlines()
    assert lines[0].split() == ["partner", "enabled", "methods", "source", "version"], stdout
    return {line.split()[0]: line.split()[1:] for line in lines[1:] if NOT_LOADED not in line}


def not_loaded(stdout: str) -> set[str]:
    """Installed third-party plugins that `gateway plugins` lists as not loaded."""
    return {line.split()[0] for line in stdout.splitlines() if NOT_LOADED in line}


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    """Both throwaway packages, built and installed once for the module."""
    root = tmp_path_factory.mktemp("third_party")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.pop("PYTHONPATH", None)
    rendered = run("-m", "gateway", "new-partner", NAME, "--external", "ext", env=env, cwd=root)
    assert rendered.returncode == 0, rendered.stderr
    project = root / "ext" / f"gateway-{NAME}"
    pip_install(project, root / "site", root)

    typo = root / "typo"
    (typo / "gateway_typo_ads").mkdir(parents=True)
    (typo / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""\
            [build-system]
            requires = ["setuptools>=69"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "gateway-typo-ads"
            version = "0.0.1"

            [project.entry-points.{ENTRY_POINT_GROUP}]
            {TYPO} = "gateway_typo_ads"

            [tool.setuptools]
            packages = ["gateway_typo_ads"]
            """
        ),
        encoding="utf-8",
    )
    (typo / "gateway_typo_ads" / "__init__.py").write_text(
        textwrap.dedent(
            """\
            from gateway import hookimpl


            @hookimpl
            def register_partner(register):  # misspelt: the hook is register_partners
                raise AssertionError("never called")
            """
        ),
        encoding="utf-8",
    )
    pip_install(typo, root / "typo_site", root)

    config = root / "gateway.toml"
    config.write_text(
        f"[partners.kochava]\nenabled = true\n\n[partners.{NAME}]\nenabled = true\n",
        encoding="utf-8",
    )
    return Packages(root, rendered, project, root / "site", root / "typo_site", config)


def extra_env(packages: Packages, allow: str | None) -> dict[str, str]:
    extra = {"PYTHONPATH": packages.pythonpath(), "GATEWAY_CONFIG": str(packages.config)}
    if allow is not None:
        extra["GATEWAY_PLUGINS"] = allow
    return extra


@pytest.fixture(scope="module")
def allowed_gateway(
    packages: Packages, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveGateway]:
    """GATEWAY_PLUGINS=zeta-ads, with the misspelt package importable but not allowed."""
    gateway = start_gateway(tmp_path_factory.mktemp("allowed"), extra_env(packages, NAME))
    yield gateway
    stop_gateway(gateway)


#: GATEWAY_PLUGINS unset, empty, or naming others (near misses included).
LEFT_OUT = [None, "", " , ", "zeta,zeta_ads,gateway-zeta-ads,kochava"]


@pytest.fixture(scope="module", params=LEFT_OUT, ids=["unset", "empty", "blank", "others"])
def left_out(
    request: pytest.FixtureRequest, packages: Packages, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveGateway]:
    allow: str | None = request.param
    gateway = start_gateway(tmp_path_factory.mktemp("left_out"), extra_env(packages, allow))
    assert ("GATEWAY_PLUGINS" in gateway.env) == (allow is not None)
    yield gateway
    stop_gateway(gateway)


# -- the package ---------------------------------------------------------------------------------


def test_new_partner_external_writes_a_distribution(packages: Packages) -> None:
    assert f"Created partner '{NAME}' in ext/gateway-{NAME}." in packages.rendered.stdout
    pyproject = tomllib.loads((packages.project / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["name"] == f"gateway-{NAME}"
    assert pyproject["project"]["version"] == "0.1.0"
    assert pyproject["project"]["entry-points"][ENTRY_POINT_GROUP] == {NAME: "gateway_zeta_ads"}
    package = packages.project / "gateway_zeta_ads"
    assert (package / "__init__.py").is_file() and (package / "mapping.py").is_file()
    assert f'name="{NAME}"' in (package / "__init__.py").read_text(encoding="utf-8")
    # Installed, samples included, into the private folder only.
    installed = packages.site / "gateway_zeta_ads"
    assert (installed / "samples" / "install_attributed.json").is_file()
    entry_points = next(packages.site.glob("gateway_zeta_ads-0.1.0.dist-info")) / "entry_points.txt"
    assert f"{NAME} = gateway_zeta_ads" in entry_points.read_text(encoding="utf-8")


# -- allowed -------------------------------------------------------------------------------------


def test_allowed_it_is_listed_with_its_distribution(packages: Packages) -> None:
    done = run("-m", "gateway", "plugins", env=packages.env(NAME), cwd=packages.root)
    assert done.returncode == 0, done.stderr
    rows = plugin_rows(done.stdout)
    assert rows[NAME] == ["yes", "GET,POST", f"gateway-{NAME}", "0.1.0"]
    assert rows["kochava"][2] == "built-in"
    assert TYPO not in rows and "Traceback" not in done.stderr  # installed, not allowed: ignored
    assert not_loaded(done.stdout) == {TYPO}


def test_allowed_it_passes_the_conformance_kit(packages: Packages) -> None:
    done = run("-m", "gateway", "conformance", NAME, env=packages.env(NAME), cwd=packages.root)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "all promises kept"
    assert f"ok   {NAME} http_round_trip" in done.stdout and "FAIL" not in done.stdout


def test_allowed_it_is_routed_and_stored(packages: Packages, allowed_gateway: LiveGateway) -> None:
    key = allowed_gateway.create_key(NAME)
    sample = (
        packages.site / "gateway_zeta_ads" / "samples" / "install_attributed.json"
    ).read_bytes()
    url = f"{allowed_gateway.base_url}/partners/{NAME}/postback"
    r = httpx.post(url, content=sample, headers={"X-Api-Key": key}, timeout=10)
    assert (r.status_code, r.json()["status"]) == (202, "accepted"), r.text
    r = httpx.post(url, content=sample, headers={"X-Api-Key": key}, timeout=10)
    assert (r.status_code, r.json()["status"]) == (200, "duplicate"), r.text
    # The built-in partner works beside it; its key does not open the third-party route.
    kochava_key = allowed_gateway.create_key("kochava")
    r = httpx.post(url, content=sample, headers={"X-Api-Key": kochava_key}, timeout=10)
    assert r.status_code == 401, r.text

    listing = httpx.get(
        f"{allowed_gateway.base_url}/events",
        params={"partner": NAME},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=10,
    )
    assert listing.status_code == 200, listing.text
    [event] = listing.json()["events"]
    assert event["partner"] == NAME
    assert (event["source"], event["campaign"], event["dedupe_key"]) == (
        "Fake Network",
        "FAKE_spring",
        "fake-evt-0001",
    )


# -- left out of the allow-list ------------------------------------------------------------------


def test_left_out_it_is_not_listed(left_out: LiveGateway) -> None:
    done = left_out.cli("plugins")
    assert done.returncode == 0, done.stderr
    rows = plugin_rows(done.stdout)
    assert NAME not in rows and TYPO not in rows
    assert set(rows) == set(load_partners(allow=()))  # the built-ins, and only they


def test_left_out_it_is_not_routed(packages: Packages, left_out: LiveGateway) -> None:
    sample = (
        packages.site / "gateway_zeta_ads" / "samples" / "install_attributed.json"
    ).read_bytes()
    url = f"{left_out.base_url}/partners/{NAME}/postback"
    r = httpx.post(url, content=sample, params={"api_key": "gwk_whatever"}, timeout=10)
    assert r.status_code == 404, r.text
    assert r.json()["error"] == "not_found"
    # The gateway itself is up and serving its built-in partner.
    kochava = httpx.get(f"{left_out.base_url}/partners/kochava/postback", timeout=10)
    assert kochava.status_code == 401, kochava.text


def test_left_out_no_key_can_be_made_for_it(left_out: LiveGateway) -> None:
    done = left_out.cli("keys", "create", NAME)
    assert done.returncode == 2
    assert f"unknown partner '{NAME}' (known: " in done.stderr
    known = done.stderr.split("(known: ")[1].split(")")[0].split(", ")
    assert "kochava" in known and NAME not in known
    assert "Traceback" not in done.stderr


# -- a misspelt hook -----------------------------------------------------------------------------


@pytest.mark.parametrize("allow", [TYPO, f"{NAME},{TYPO}"])
def test_misspelt_hook_stops_plugins_and_serve_when_allowed(packages: Packages, allow: str) -> None:
    env = packages.env(allow)
    port = str(free_port())
    for args in (("plugins",), ("serve", "--port", port)):
        done = run("-m", "gateway", *args, env=env, cwd=packages.root, timeout=30)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert f"plugin '{TYPO}'" in done.stderr, done.stderr
        assert "'register_partner'" in done.stderr, done.stderr
        assert "misspelt" in done.stderr
        assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
        assert "listening" not in done.stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_misspelt_hook_not_allowed_is_ignored(packages: Packages) -> None:
    for allow in (None, NAME):
        done = run("-m", "gateway", "plugins", env=packages.env(allow), cwd=packages.root)
        assert done.returncode == 0, done.stderr
        assert TYPO not in plugin_rows(done.stdout) and "register_partner" not in done.stderr


# -- and this test process never saw any of it ---------------------------------------------------


def test_the_test_process_never_sees_the_packages(packages: Packages) -> None:
    assert packages.site.joinpath("gateway_zeta_ads", "__init__.py").is_file()
    assert packages.typo_site.joinpath("gateway_typo_ads", "__init__.py").is_file()
    assert not {NAME, TYPO} & set(load_partners())
    # Even allowed by name they are not found: neither is installed where this process looks.
    assert not {NAME, TYPO} & set(load_partners(allow=(NAME, TYPO)))
    assert not {NAME, TYPO} & {ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert importlib.util.find_spec("gateway_zeta_ads") is None
    assert importlib.util.find_spec("gateway_typo_ads") is None
