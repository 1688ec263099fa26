"""``gateway replay`` and ``gateway export`` over real storage: SQLite files in temporary folders
and, where marked, a fresh PostgreSQL database. The CLI runs as a real subprocess with the
environment pointing at that storage; the re-map after a plugin fix runs in-process, because it
needs a partner whose mapping changes between two runs."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.config import Config
from gateway.events import AttributionEvent
from gateway.hookspecs import PartnerSpec
from gateway.normalise import flag, text, timestamp
from gateway.plugins import LoadedPartner, load_partners
from gateway.postback import Gateway
from gateway.replay import NoStatus, Report, export, read_jsonl, replay
from gateway.status import StatusRecord, open_status
from gateway.storage import Storage, open_storage
from tests.fixtures import ADMIN_TOKEN, IOS_FIELDS, ROOT, make_config, new_key
from tests.test_storage import postgres_database

T = TypeVar("T")

SAMPLES = ROOT / "plugins"
KOCHAVA = sorted((SAMPLES / "kochava" / "samples").glob("*.json"))
IOS_SAMPLE = SAMPLES / "kochava" / "samples" / "install_ios_attributed.json"


# -- helpers ---------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/data/gateway.db"
    else:
        with postgres_database() as url:
            yield url


def cli_env(tmp_path: Path, storage_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        {
            "GATEWAY_CONFIG": str(ROOT / "config" / "gateway.toml"),
            "GATEWAY_DATA_DIR": str(tmp_path / "data"),
            "GATEWAY_STORAGE_URL": storage_url or f"sqlite:///{tmp_path}/data/gateway.db",
            "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
        }
    )
    return env


def gateway(
    env: Mapping[str, str], *args: str | Path, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *map(str, args)],
        env=dict(env),
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done


def counts(stdout: str) -> dict[str, int]:
    """The report's "name  value" lines."""
    out = {}
    for line in stdout.splitlines():
        name, _, value = line.rpartition(" ")
        if value.isdigit():
            out[name.strip()] = int(value)
    return out


def with_storage(url: str, work: Callable[[Storage], Awaitable[T]]) -> T:
    async def main() -> T:
        storage = open_storage(url)
        await storage.open()
        try:
            return await work(storage)
        finally:
            await storage.close()

    return asyncio.run(main())


def stored(url: str) -> dict[tuple[str, str], AttributionEvent]:
    """Every stored event by (partner, dedupe key)."""
    events = with_storage(url, lambda s: s.events(limit=-1))
    return {(e.partner, e.dedupe_key): e for e in events}


def payload_lines(*pairs: tuple[str, Path | dict[str, Any]]) -> bytes:
    lines = []
    for partner, payload in pairs:
        data = json.loads(payload.read_bytes()) if isinstance(payload, Path) else payload
        lines.append(json.dumps({"partner": partner, "payload": data}, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode()


def mapped_fields(event: AttributionEvent) -> dict[str, Any]:
    """What the mapping decides: everything but the store's event_id."""
    fields = msgspec.to_builtins(event)
    del fields["event_id"]
    return fields


# -- backfill --------------------------------------------------------------------------------------


def test_backfill_stores_new_events_and_reports_duplicates(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    url = env["GATEWAY_STORAGE_URL"]
    first_file = tmp_path / "first.jsonl"
    first_file.write_bytes(payload_lines(*(("kochava", p) for p in KOCHAVA)))

    first = gateway(env, "replay", first_file)
    assert first.returncode == 0, first.stderr
    assert counts(first.stdout) == {
        "lines": 6,
        "events": 6,
        "stored": 5,
        "duplicate": 0,
        "ignored_organic": 1,
        "ignored_restricted": 0,
        "failed": 0,
    }
    after_first = stored(url)
    assert len(after_first) == 5
    ios = after_first[("kochava", "fake-txn-0001")]
    assert {k: v for k, v in msgspec.to_builtins(ios).items() if k in IOS_FIELDS} == IOS_FIELDS
    assert ios.raw == json.loads(IOS_SAMPLE.read_bytes())

    # The same lines again, and one new event: only the new one is stored.
    second_file = tmp_path / "second.jsonl"
    appsflyer = SAMPLES / "appsflyer" / "samples" / "install_attributed.json"
    second_file.write_bytes(first_file.read_bytes() + payload_lines(("appsflyer", appsflyer)))
    second = gateway(env, "replay", second_file)
    assert second.returncode == 0, second.stderr
    assert counts(second.stdout)["stored"] == 1
    assert counts(second.stdout)["duplicate"] == 5
    assert counts(second.stdout)["ignored_organic"] == 1
    after_second = stored(url)
    assert len(after_second) == 6
    for key, event in after_first.items():  # duplicates are left exactly as they were
        assert after_second[key] == event


def test_sample_files_with_partner_and_organic_or_restricted_payloads(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    url = env["GATEWAY_STORAGE_URL"]
    restricted = tmp_path / "restricted.json"
    sample = json.loads(IOS_SAMPLE.read_bytes())
    restricted.write_text(
        json.dumps({**sample, "network_name": "Facebook Ads", "transaction_id": "fb-1"})
    )
    done = gateway(
        env,
        "replay",
        "--partner",
        "kochava",
        SAMPLES / "kochava" / "samples" / "install_organic.json",
        restricted,
        IOS_SAMPLE,
    )
    assert done.returncode == 0, done.stderr
    assert counts(done.stdout) == {
        "files": 3,
        "events": 3,
        "stored": 1,
        "duplicate": 0,
        "ignored_organic": 1,
        "ignored_restricted": 1,
        "failed": 0,
    }
    assert list(stored(url)) == [("kochava", "fake-txn-0001")]

    # A JSON array is a batch; a query-string sample is read as form fields, as over HTTP.
    branch_batch = SAMPLES / "branch" / "samples" / "batch_reinstall_and_registration.json"
    batch = gateway(env, "replay", "--partner", "branch", branch_batch)
    assert batch.returncode == 0, batch.stderr
    assert counts(batch.stdout)["files"] == 1
    assert counts(batch.stdout)["events"] == len(json.loads(branch_batch.read_bytes()))
    assert counts(batch.stdout)["events"] == sum(p == "branch" for p, _ in stored(url))
    query = SAMPLES / "adjust" / "samples" / "install_attributed.query"
    adjust = gateway(env, "replay", "--partner", "adjust", "-", stdin=query.read_bytes())
    assert adjust.returncode == 0, adjust.stderr
    assert counts(adjust.stdout)["stored"] == 1
    (adjust_event,) = [e for (p, _), e in stored(url).items() if p == "adjust"]
    assert adjust_event.source == "Fake Network"  # percent-decoded once
    assert adjust_event.raw["network_name"] == "Fake Network"


# -- bad lines and exit status ---------------------------------------------------------------------


def test_bad_lines_are_reported_with_line_numbers_and_do_not_stop_the_run(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    sample = json.loads(IOS_SAMPLE.read_bytes())
    bad_time = {**sample, "transaction_id": "txn-bad", "install_time": "not a time"}
    good_last = {**sample, "transaction_id": "txn-last"}
    lines = [
        json.dumps({"partner": "kochava", "payload": sample}),  # 1
        "this is not json",  # 2
        "[1, 2]",  # 3
        json.dumps({"partner": "nosuchpartner", "payload": sample}),  # 4
        json.dumps({"partner": "kochava"}),  # 5
        json.dumps({"partner": "kochava", "payload": bad_time}),  # 6
        "",  # 7: blank lines are skipped
        json.dumps({"partner": "kochava", "raw": good_last, "received_at": "yesterday"}),  # 8
        json.dumps({"partner": "kochava", "payload": good_last}),  # 9
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")

    done = gateway(env, "replay", path)
    assert done.returncode == 1
    errors = done.stderr.splitlines()
    assert errors[0].startswith(f"{path}:2: not JSON: JSON is malformed")
    assert errors[1:] == [
        f"{path}:3: not a JSON object",
        f"{path}:4: unknown partner 'nosuchpartner'",
        f'{path}:5: "raw" must be a JSON object (the payload to map)',
        f"{path}:6: install_time: unrecognised time format 'not a time'",
        f"{path}:8: received_at: unrecognised time format 'yesterday'",
    ]
    report = counts(done.stdout)
    assert report["lines"] == 8
    assert report["failed"] == 6
    assert report["stored"] == 2
    assert set(stored(env["GATEWAY_STORAGE_URL"])) == {
        ("kochava", "fake-txn-0001"),
        ("kochava", "txn-last"),
    }

    # Every line handled: 0. Usage errors: 2.
    good = tmp_path / "good.jsonl"
    good.write_text(lines[0] + "\n")
    assert gateway(env, "replay", good).returncode == 0
    assert gateway(env, "replay", tmp_path / "missing.jsonl").returncode == 2
    unknown = gateway(env, "replay", "--partner", "nosuchpartner", IOS_SAMPLE)
    assert unknown.returncode == 2
    assert "unknown partner 'nosuchpartner'" in unknown.stderr
    assert gateway(env, "replay").returncode == 2
    assert gateway(env, "export", "--since", "not a time").returncode == 2


# -- dry run ---------------------------------------------------------------------------------------


def test_dry_run_writes_nothing_and_reports_what_the_run_does(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    url = env["GATEWAY_STORAGE_URL"]
    path = tmp_path / "in.jsonl"
    # Six samples and the iOS install twice more: a file can repeat a dedupe key.
    path.write_bytes(
        payload_lines(*(("kochava", p) for p in KOCHAVA), ("kochava", IOS_SAMPLE))
        + payload_lines(("kochava", IOS_SAMPLE))
    )

    dry = gateway(env, "replay", "--dry-run", path)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[0] == "dry run: nothing was written"
    assert with_storage(url, lambda s: s.count()) == 0
    real = gateway(env, "replay", path)
    assert real.returncode == 0, real.stderr
    assert counts(dry.stdout) == counts(real.stdout)
    assert counts(real.stdout)["stored"] == 5
    assert counts(real.stdout)["duplicate"] == 2

    # A re-map dry run after the stored events were changed: says what --update would rewrite.
    before = stored(url)
    ios = before[("kochava", "fake-txn-0001")]
    tampered = msgspec.structs.replace(ios, campaign="tampered")
    assert with_storage(url, lambda s: s.replace([tampered]))[0].outcome == "updated"
    dry_update = gateway(env, "replay", "--update", "--dry-run", path)
    assert dry_update.returncode == 0, dry_update.stderr
    assert counts(dry_update.stdout)["updated"] == 1
    # The iOS install's second and third lines compare with what the first would have written.
    assert counts(dry_update.stdout)["unchanged"] == 6
    assert stored(url)[("kochava", "fake-txn-0001")].campaign == "tampered"
    assert counts(gateway(env, "replay", "--update", path).stdout) == counts(dry_update.stdout)
    assert stored(url) == before


# -- re-map ----------------------------------------------------------------------------------------


def test_update_rewrites_tampered_events_and_keeps_their_ids(
    storage_url: str, tmp_path: Path
) -> None:
    """Stored events whose mapped fields are wrong (changed through storage.replace) come back
    as the mapping makes them, from their own raw payloads, exported and replayed with --update."""
    env = cli_env(tmp_path, storage_url)
    samples = tmp_path / "samples.jsonl"
    samples.write_bytes(payload_lines(*(("kochava", p) for p in KOCHAVA)))
    assert gateway(env, "replay", samples).returncode == 0
    good = stored(storage_url)
    key = ("kochava", "fake-txn-0001")
    wrong = msgspec.structs.replace(
        good[key], campaign="WRONG", source=None, idfa=None, kind="reinstall"
    )
    with_storage(storage_url, lambda s: s.replace([wrong]))
    assert stored(storage_url)[key].campaign == "WRONG"

    export_file = tmp_path / "export.jsonl"
    exported = gateway(env, "export", "--partner", "kochava")
    assert exported.returncode == 0, exported.stderr
    export_file.write_text(exported.stdout)

    backfill = gateway(env, "replay", export_file)  # without --update: left alone
    assert counts(backfill.stdout)["duplicate"] == 5
    assert stored(storage_url)[key].campaign == "WRONG"

    done = gateway(env, "replay", "--update", export_file)
    assert done.returncode == 0, done.stderr
    assert counts(done.stdout) == {
        "lines": 5,
        "events": 5,
        "stored": 0,
        "updated": 1,
        "unchanged": 4,
        "ignored_organic": 0,
        "ignored_restricted": 0,
        "failed": 0,
    }
    assert stored(storage_url) == good
    fixed = stored(storage_url)[key]
    assert fixed.event_id == good[key].event_id and fixed.received_at == good[key].received_at
    assert {k: v for k, v in msgspec.to_builtins(fixed).items() if k in IOS_FIELDS} == IOS_FIELDS


def acme_partner(fixed: bool) -> dict[str, LoadedPartner]:
    """A partner whose mapping had a bug: the campaign was read from the ad group field."""

    def mapping(payload: Mapping[str, Any]) -> AttributionEvent:
        campaign_field = "campaign" if fixed else "adgroup"
        return AttributionEvent(
            kind="install",
            attributed=flag(payload.get("attributed"), "attributed") is not False,
            source=text(payload.get("network"), "network"),
            campaign=text(payload.get(campaign_field), campaign_field),
            adgroup=text(payload.get("adgroup"), "adgroup"),
            install_time=timestamp(payload.get("installed_at"), "installed_at"),
            dedupe_key=text(payload.get("click_id"), "click_id") or "",
        )

    spec = PartnerSpec(name="acme", map=mapping, display_name="Acme")
    return load_partners(allow=()) | {"acme": LoadedPartner(spec=spec, source="tests", version="0")}


ACME = [
    {"click_id": "c1", "network": "Acme Ads", "campaign": "spring", "adgroup": "g1"},
    {"click_id": "c2", "network": "Acme Ads", "campaign": "summer", "adgroup": "g2"},
    {"click_id": "c3", "network": "Acme Ads", "campaign": "same", "adgroup": "same"},
    {"click_id": "c4", "network": "Acme Ads", "attributed": "false", "campaign": "x"},
]


def test_remap_after_a_plugin_fix_rewrites_fields_and_keeps_event_ids(tmp_path: Path) -> None:
    """Events stored over HTTP by the buggy mapping; export, then replay with the fixed one."""
    config = make_config(tmp_path / "data", acme=True)
    key = new_key(config, "acme")
    with TestClient(create_app(config, partners=acme_partner(fixed=False))) as client:
        for payload in ACME:
            answer = client.post(
                "/partners/acme/postback", json=payload, headers={"X-Api-Key": key}
            )
            assert answer.status_code in (200, 202), answer.text
    url = config.storage.url
    buggy = stored(url)
    assert {k: e.campaign for (_, k), e in buggy.items()} == {"c1": "g1", "c2": "g2", "c3": "same"}

    async def run(fixed: bool, update: bool, dry_run: bool = False) -> Report:
        storage = open_storage(url)
        await storage.open()
        try:
            out = io.BytesIO()
            await export(storage, out)
            items = read_jsonl("export.jsonl", out.getvalue().splitlines(keepends=True))
            gw = Gateway(config, acme_partner(fixed), storage, NoStatus())
            return await replay(gw, items, update=update, dry_run=dry_run)
        finally:
            await storage.close()

    same_mapping = asyncio.run(run(fixed=False, update=True))
    assert same_mapping.outcomes == {"unchanged": 3}
    backfill = asyncio.run(run(fixed=True, update=False))
    assert backfill.outcomes == {"duplicate": 3}
    assert stored(url) == buggy
    dry = asyncio.run(run(fixed=True, update=True, dry_run=True))
    assert dry.outcomes == {"updated": 2, "unchanged": 1}
    assert stored(url) == buggy

    remap = asyncio.run(run(fixed=True, update=True))
    assert remap == Report(lines=3, events=3, failed=0, outcomes={"updated": 2, "unchanged": 1})
    fixed = stored(url)
    assert {k: e.campaign for (_, k), e in fixed.items()} == {
        "c1": "spring",
        "c2": "summer",
        "c3": "same",
    }
    for key_, event in fixed.items():
        before = buggy[key_]
        assert event.event_id == before.event_id
        assert event.received_at == before.received_at
        assert event.raw == before.raw
        assert msgspec.structs.replace(event, campaign=before.campaign) == before


# -- export and round trip -------------------------------------------------------------------------


def test_export_then_replay_on_a_fresh_database_reproduces_the_events(
    storage_url: str, tmp_path: Path
) -> None:
    """Events stored over HTTP (single postbacks, a batch, form fields) in one store; exported,
    and replayed into a fresh SQLite store (and from there back into ``storage_url``'s kind)."""
    config = make_config(tmp_path / "source")
    config.storage.url = storage_url
    bodies = [("kochava", p.read_bytes(), "application/json") for p in KOCHAVA] + [
        (
            "branch",
            (SAMPLES / "branch/samples/batch_reinstall_and_registration.json").read_bytes(),
            "application/json",
        ),
        (
            "adjust",
            (SAMPLES / "adjust/samples/install_attributed.query").read_bytes(),
            "application/x-www-form-urlencoded",
        ),
        (
            "appsflyer",
            (SAMPLES / "appsflyer/samples/event_purchase.json").read_bytes(),
            "text/plain",
        ),
    ]
    with TestClient(create_app(config)) as client:
        for partner, body, content_type in bodies:
            key = new_key(config, partner)
            answer = client.post(
                f"/partners/{partner}/postback",
                content=body,
                headers={"X-Api-Key": key, "Content-Type": content_type},
            )
            assert answer.status_code in (200, 202), answer.text
    source = stored(storage_url)
    assert {p for p, _ in source} == {"kochava", "branch", "adjust", "appsflyer"}

    source_env = cli_env(tmp_path / "source", storage_url)
    exported = gateway(source_env, "export")
    assert exported.returncode == 0, exported.stderr
    assert exported.stderr.strip() == f"exported {len(source)} event(s)"
    lines = exported.stdout.splitlines()
    assert len(lines) == len(source)

    # What GET /events shows is what export writes, one event a line (oldest first).
    with TestClient(create_app(config)) as client:
        shown = client.get(
            "/events?limit=1000", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        ).json()["events"]
    assert [json.loads(line) for line in lines] == list(reversed(shown))

    fresh_env = cli_env(tmp_path / "fresh")
    done = gateway(fresh_env, "replay", "-", stdin=exported.stdout.encode())
    assert done.returncode == 0, done.stderr
    assert counts(done.stdout)["stored"] == len(source)
    copy = stored(fresh_env["GATEWAY_STORAGE_URL"])
    assert copy.keys() == source.keys()
    for key, event in source.items():
        assert mapped_fields(copy[key]) == mapped_fields(event), key
        assert copy[key].event_id != event.event_id  # the fresh store's own ids

    # Filters: one partner; since a time.
    only = gateway(source_env, "export", "--partner", "branch")
    assert {json.loads(line)["partner"] for line in only.stdout.splitlines()} == {"branch"}
    assert len(only.stdout.splitlines()) == sum(p == "branch" for p, _ in source)
    newest = max(e.received_at for e in source.values() if e.received_at)
    since = gateway(source_env, "export", "--since", newest.isoformat())
    assert 1 <= len(since.stdout.splitlines()) < len(source)
    assert all(
        timestamp(json.loads(line)["received_at"], "received_at") == newest
        for line in since.stdout.splitlines()
    )
    future = gateway(source_env, "export", "--since", "2199-01-01")
    assert future.returncode == 0 and future.stdout == ""


# -- status ----------------------------------------------------------------------------------------


def status_of(config: Config, partner: str) -> StatusRecord:
    async def main() -> StatusRecord:
        store = open_status(config.status.redis_url, config.data_dir, config.status.key_prefix)
        await store.open()
        try:
            return await store.get(partner)
        finally:
            await store.close()

    return asyncio.run(main())


def test_replay_does_not_move_last_success_at_or_counters(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data")
    key = new_key(config)
    sample = json.loads(IOS_SAMPLE.read_bytes())
    with TestClient(create_app(config)) as client:
        answer = client.post("/partners/kochava/postback", json=sample, headers={"X-Api-Key": key})
        assert answer.status_code == 202
    before = status_of(config, "kochava")
    assert before.last_success_at is not None and before.counters.accepted == 1

    env = cli_env(tmp_path)
    assert env["GATEWAY_STORAGE_URL"] == config.storage.url
    installs = [{**sample, "transaction_id": f"replayed-{n}"} for n in range(3)]
    path = tmp_path / "installs.jsonl"
    path.write_bytes(payload_lines(*(("kochava", p) for p in [sample, *installs])))
    done = gateway(env, "replay", path)
    assert done.returncode == 0, done.stderr
    assert counts(done.stdout)["stored"] == 3  # attributed installs, newly stored
    update = gateway(env, "replay", "--update", path)
    assert update.returncode == 0, update.stderr
    assert status_of(config, "kochava") == before
    assert "last_success_at" in gateway(env, "replay", "--help").stdout
