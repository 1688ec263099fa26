"""Schemathesis against the gateway's own OpenAPI document (/schema/openapi.json), run as its
CLI against a live ``gateway serve``: every documented operation, with generated valid and
invalid parameters and bodies, each request carrying the key of the partner in its path or the
admin token (tests/schemathesis_hooks.py). Every check runs except ``positive_data_acceptance``:
the document says a postback's fields are free-form, but a payload that lacks what the partner's
mapping needs is rightly answered 422, as documented. No 5xx, every answer documented and
matching its schema and content type.

Examples per operation: 10 with the default hypothesis profile (a fixed seed), 10x with
``HYPOTHESIS_PROFILE=ci`` and 100x with ``deep`` (random seeds); the count is printed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from gateway.plugins import load_partners
from tests.fixtures import ADMIN_TOKEN, ROOT, make_config, new_key, start_gateway, stop_gateway
from tests.hostile import PROFILE, scale

EXAMPLES = 10


def test_schemathesis_finds_no_5xx_and_every_answer_matches_the_schema(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data")  # the same data folder start_gateway uses
    keys = {name: new_key(config, name) for name in sorted(load_partners())}
    gateway = start_gateway(tmp_path)
    try:
        env = {
            **os.environ,
            "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks",
            "PYTHONPATH": str(ROOT),
            "GATEWAY_TEST_PARTNER_KEYS": json.dumps(keys),
            "GATEWAY_TEST_ADMIN_TOKEN": ADMIN_TOKEN,
        }
        command = [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{gateway.base_url}/schema/openapi.json",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            str(EXAMPLES * scale()),
            "--generation-database",
            "none",
            "--request-timeout",
            "30",
            "--report",
            "ndjson",
            "--report-dir",
            str(tmp_path / "schemathesis"),
            "--no-color",
        ]
        if PROFILE == "default":
            command += ["--seed", "1"]
        done = subprocess.run(
            command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=3000
        )
    finally:
        stop_gateway(gateway)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    generated = re.search(r"(\d+) generated, (\d+) passed", output)
    assert generated, output
    print(f"schemathesis: {generated.group(0)} ({EXAMPLES * scale()} examples per operation)")
    assert int(generated.group(1)) == int(generated.group(2)) > 9 * EXAMPLES, output
    assert "9 selected / 9 total" in output, output  # every documented operation
    # Nothing the gateway answered was a 5xx (its log has one line per postback).
    statuses = [
        json.loads(line).get("status")
        for line in gateway.log_text().splitlines()
        if line.startswith("{") and '"msg": "postback"' in line
    ]
    assert statuses and all(status < 500 for status in statuses), sorted(set(statuses))
    assert 202 in statuses  # the samples (the document's examples) were accepted
