"""A smoke test of the benchmark harness (bench/): it builds valid, distinct postbacks of every
partner's samples, and one tiny run of ``bench/run.py`` serves both targets and finds every
accepted event stored. Speed is measured by running bench/run.py, never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import load
from gateway import body as reader
from gateway.plugins import load_partners
from gateway.postback import map_payload

ROOT = Path(__file__).resolve().parent.parent


def payloads(template: load.Template, seq: bytes) -> list[dict[str, object]]:
    """What the gateway reads from one rendered request (query merged under the body)."""
    raw = template.render(seq, b"127.0.0.1")
    head, _, body = raw.partition(b"\r\n\r\n")
    target = head.split(b"\r\n")[0].split(b" ")[1]
    query = reader.parse_query(target.partition(b"?")[2])
    items = reader.parse_body(body, template.content_type or "", 50)
    return reader.merge(query, items)


def test_every_partner_sample_becomes_distinct_valid_postbacks() -> None:
    partners = load_partners()
    templates = load.templates(dict.fromkeys(load.PARTNERS, "a-key"))
    assert {t.partner for t in templates} == set(load.PARTNERS)
    for partner in load.PARTNERS:
        folder = ROOT / "plugins" / partner / "samples"
        assert {t.sample for t in templates if t.partner == partner} == {
            p.name for p in folder.iterdir() if p.suffix in (".json", ".query")
        }
    for template in templates:
        spec = partners[template.partner].spec
        keys = []
        for seq in (b"r1-1", b"r1-2"):
            found = payloads(template, seq)
            assert len(found) == template.events
            assert all(p.get("api_key") is None for p in found)  # the key is not in the payload
            keys += [e.dedupe_key for p in found for e in map_payload(spec, p)]
        assert len(keys) == len(set(keys)), f"{template.sample}: postbacks would be duplicates"


def test_the_mix_takes_each_partner_in_turn() -> None:
    templates = load.templates(dict.fromkeys(load.PARTNERS, "k"))
    first = [next_t.partner for next_t, _ in zip(load.mix(templates), range(12), strict=False)]
    assert first == list(load.PARTNERS) * 2


def test_a_tiny_run_serves_both_targets_and_finds_every_accepted_event(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--duration=1",
            "--warmup=0.3",
            "--connections=4",
            f"--out={tmp_path}",
            "--label=smoke",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (result,) = tmp_path.glob("*-smoke.json")
    report = json.loads(result.read_text())
    runs = {r["target"]: r for r in report["runs"]}
    assert set(runs) == {"bare", "gateway"}
    gateway = runs["gateway"]
    assert gateway["requests"] > 0 and gateway["errors"] == {}
    assert set(gateway["statuses"]) <= {"200", "202"}  # accepted or ignored (organic…)
    assert gateway["accepted_events"] > 0
    assert gateway["stored_events"] == gateway["accepted_events"]
    assert gateway["every_accepted_stored"] is True
    assert gateway["ids_answered_not_stored"] == 0
    assert gateway["ids_stored_not_answered"] == 0
    assert gateway["ids_stored_twice"] == 0
    assert gateway["duplicates_answered"] == 0
    assert "gateway/bare throughput, workers=1" in report["ratios"]
    assert (tmp_path / result.name.replace(".json", ".txt")).read_text().startswith("bench ")


def test_store_ids_stores_every_row_with_both_kinds_of_id() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "store_ids.py"), "--rows", "300", "--group", "7"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    assert [row[:3] for row in rows] == [["random", "(v4)", "7"], ["time", "(v7)", "7"]]
    assert all(float(row[3]) > 0 and float(row[4]) >= 0 for row in rows)
