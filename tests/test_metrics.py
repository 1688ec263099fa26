"""Observability: ``/metrics`` (Prometheus text format, parsed with prometheus_client's own
parser), ``/healthz`` and ``/readyz``, and the JSON log line of every postback. Everything runs
against the real app over real SQLite, the embedded status store or Redis, and, for several
workers, a real ``gateway serve --workers 2``."""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import TestClient
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.config import Config
from gateway.logs import JsonFormatter
from gateway.metrics import DURATION_BUCKETS, MULTIPROC_FOLDER
from tests.fixtures import (
    ADMIN_TOKEN,
    kochava_samples,
    make_config,
    new_key,
    start_gateway,
    stop_gateway,
)

SAMPLES = kochava_samples()
IOS = json.loads(SAMPLES["install_ios_attributed.json"])
ORGANIC = json.loads(SAMPLES["install_organic.json"])
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

Labels = tuple[tuple[str, str], ...]


def ios(txn: str, **changes: Any) -> dict[str, Any]:
    """The attributed iOS install as a new event (its own transaction id)."""
    return {**IOS, "transaction_id": txn, **changes}


def body(payload: Any) -> bytes:
    return json.dumps(payload).encode()


def scrape_text(client: TestClient[Any]) -> str:
    response = client.get("/metrics")  # open, like /healthz: no token
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return response.text


def series(text: str, name: str) -> dict[Labels, float]:
    """Every sample called ``name`` in a scrape, by its labels, as prometheus_client parses it."""
    out: dict[Labels, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                labels = tuple(sorted(sample.labels.items()))
                assert labels not in out, f"{name}{labels} twice"
                out[labels] = sample.value
    return out


def labels(**values: str) -> Labels:
    return tuple(sorted(values.items()))


def scalar(text: str, name: str) -> float:
    [(labelset, value)] = series(text, name).items()
    assert labelset == ()
    return value


# -- counters match what was sent ---------------------------------------------------------------


def test_counters_and_histogram_match_the_requests_sent(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", tune=False)  # tune: a known partner, disabled
    key = new_key(config)
    url = f"/partners/kochava/postback?api_key={key}"
    too_big = b'{"pad": "' + b"x" * config.limits.max_body_bytes + b'"}'
    # (path, body, headers, expected status code)
    sent: list[tuple[str, bytes, dict[str, str], int]] = [
        (url, body(ios("m-1")), {}, 202),
        (url, body(ios("m-2")), {}, 202),
        (url, body(ios("m-1")), {}, 200),  # a retry: duplicate
        (url, body(ORGANIC), {}, 200),
        (url, body(ios("m-3", network_name="Facebook Ads")), {}, 200),
        (url.replace(key, "not-a-key"), body(ios("m-4")), {}, 401),
        ("/partners/kochava/postback", body(ios("m-4")), {}, 401),  # no key at all
        (url, body(ios("m-5", install_time="not a time")), {}, 422),
        (f"/partners/nope-{uuid.uuid4().hex}/postback", b"{}", {}, 404),
        (f"/partners/other-{uuid.uuid4().hex}/postback", b"{}", {}, 404),
        (url, too_big, {}, 413),
        ("/partners/tune/postback", b"{}", {"X-Api-Key": key}, 403),
        (url, body([ios("m-6"), ORGANIC]), {}, 202),  # a batch: one stored, one organic
        (url, b"{not json", {}, 400),
    ]
    with TestClient(create_app(config)) as client:
        for path, content, headers, expected in sent:
            response = client.post(path, content=content, headers=headers)
            assert response.status_code == expected, (path, response.text)
        text = scrape_text(client)

    assert series(text, "gateway_postbacks_total") == {
        labels(partner="kochava", outcome="accepted"): 2,
        labels(partner="kochava", outcome="duplicate"): 1,
        labels(partner="kochava", outcome="ignored_organic"): 1,
        labels(partner="kochava", outcome="ignored_restricted"): 1,
        labels(partner="kochava", outcome="unauthorized"): 2,
        labels(partner="kochava", outcome="invalid_payload"): 1,
        labels(partner="kochava", outcome="payload_too_large"): 1,
        labels(partner="kochava", outcome="batch"): 1,
        labels(partner="kochava", outcome="bad_request"): 1,
        # unknown names never become label values: one "(unknown)" series, whatever the URL
        labels(partner="(unknown)", outcome="not_found"): 2,
        labels(partner="tune", outcome="forbidden"): 1,
    }
    assert series(text, "gateway_events_total") == {
        labels(partner="kochava", kind="install", result="accepted"): 3,
        labels(partner="kochava", kind="install", result="duplicate"): 1,
        labels(partner="kochava", kind="install", result="ignored_organic"): 2,
        labels(partner="kochava", kind="install", result="ignored_restricted"): 1,
    }

    # The histogram: one observation per postback, each partner's buckets cumulative.
    counts = series(text, "gateway_postback_duration_seconds_count")
    assert counts == {
        labels(partner="kochava"): 11,
        labels(partner="(unknown)"): 2,
        labels(partner="tune"): 1,
    }
    assert sum(counts.values()) == len(sent)
    buckets = series(text, "gateway_postback_duration_seconds_bucket")
    sums = series(text, "gateway_postback_duration_seconds_sum")
    for labelset, count in counts.items():
        partner = dict(labelset)["partner"]
        cumulative = [buckets[labels(partner=partner, le=str(b))] for b in DURATION_BUCKETS]
        assert cumulative == sorted(cumulative)
        assert buckets[labels(partner=partner, le="+Inf")] == count
        assert 0 < sums[labelset] < 10 * count  # seconds, not milliseconds

    assert scalar(text, "gateway_storage_errors_total") == 0
    assert scalar(text, "gateway_status_errors_total") == 0


def test_apps_in_one_process_do_not_share_counts(tmp_path: Path) -> None:
    first, second = make_config(tmp_path / "one"), make_config(tmp_path / "two")
    key = new_key(first)
    with TestClient(create_app(first)) as a, TestClient(create_app(second)) as b:
        assert a.post(f"/partners/kochava/postback?api_key={key}", content=body(IOS)).status_code
        assert series(scrape_text(a), "gateway_postbacks_total") == {
            labels(partner="kochava", outcome="accepted"): 1
        }
        assert series(scrape_text(b), "gateway_postbacks_total") == {}


# -- failures: the status store and storage ------------------------------------------------------


def test_status_store_down_is_counted_and_postbacks_still_succeed(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data")
    config.status.redis_url = "redis://127.0.0.1:1/0"  # nothing listens there
    key = new_key(config)
    with TestClient(create_app(config)) as client:
        for n in range(3):
            response = client.post(
                f"/partners/kochava/postback?api_key={key}", content=body(ios(f"s-{n}"))
            )
            assert response.status_code == 202, response.text
        refused = client.post("/partners/kochava/postback?api_key=wrong", content=body(IOS))
        assert refused.status_code == 401  # its status counter cannot be written either
        assert client.get("/partners/kochava/status", headers=ADMIN).status_code == 503

        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {
            "status": "not_ready",
            "storage": "ok",
            "status_store": "unavailable",
        }
        assert "127.0.0.1" not in ready.text and "redis" not in ready.text
        assert client.get("/healthz").status_code == 200  # alive all the same

        text = scrape_text(client)
    # The status write (one round for the 3 accepted and the unauthorized, or more) failed, and
    # the admin read answered 503.
    assert scalar(text, "gateway_status_errors_total") >= 2
    assert scalar(text, "gateway_storage_errors_total") == 0
    assert series(text, "gateway_postbacks_total") == {
        labels(partner="kochava", outcome="accepted"): 3,
        labels(partner="kochava", outcome="unauthorized"): 1,
    }


def test_readyz_is_ready_when_storage_and_status_answer(
    client: TestClient[Any], status_backend: str, config: Config
) -> None:
    assert bool(config.status.redis_url) == (status_backend == "redis")
    response = client.get("/readyz")  # open: no token
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "storage": "ok", "status_store": "ok"}
    health = client.get("/healthz")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})


def test_storage_that_fails_after_start_is_not_ready_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path / "data")
    key = new_key(config)
    url = f"/partners/kochava/postback?api_key={key}"
    db_path = tmp_path / "data" / "gateway.db"
    with TestClient(create_app(config)) as client:
        assert client.post(url, content=body(ios("f-1"))).status_code == 202
        assert client.get("/readyz").status_code == 200

        # Someone else's connection drops the events table under the running gateway.
        other = sqlite3.connect(db_path)
        other.execute("DROP TABLE events")
        other.commit()
        other.close()

        with caplog.at_level(logging.WARNING, logger="gateway.http"):
            ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {
            "status": "not_ready",
            "storage": "unavailable",
            "status_store": "ok",
        }
        assert "gateway.db" not in ready.text and "events" not in ready.text
        assert "no such table: events" in caplog.text  # the detail is in the log only

        refused = client.post(url, content=body(ios("f-2")))
        assert refused.status_code == 503
        assert refused.json()["error"] == "storage_unavailable"
        assert refused.headers["retry-after"]
        assert client.get("/events", headers=ADMIN).status_code == 503
        text = scrape_text(client)

    assert scalar(text, "gateway_storage_errors_total") == 2  # the postback and /events
    assert scalar(text, "gateway_status_errors_total") == 0
    assert series(text, "gateway_postbacks_total") == {
        labels(partner="kochava", outcome="accepted"): 1,
        labels(partner="kochava", outcome="storage_unavailable"): 1,
    }
    assert series(text, "gateway_events_total") == {
        labels(partner="kochava", kind="install", result="accepted"): 1,
    }


# -- several workers: one /metrics for all of them, and the log ---------------------------------


def worker_postbacks(values_file: Path) -> float:
    """The postbacks one worker counted, from its own file in the multiprocess folder."""
    return sum(
        sample.value
        for family in MultiProcessCollector.merge([str(values_file)])
        for sample in family.samples
        if sample.name == "gateway_postbacks_total"
    )


def postbacks_total(text: str) -> dict[str, float]:
    return {dict(k)["outcome"]: v for k, v in series(text, "gateway_postbacks_total").items()}


def test_metrics_add_up_across_workers_and_log_one_line_per_postback(tmp_path: Path) -> None:
    # Values left by an earlier run must not be counted again.
    multiproc = tmp_path / "data" / MULTIPROC_FOLDER
    multiproc.mkdir(parents=True)
    stale = multiproc / "counter_1.db"
    stale.write_bytes(b"left over from an earlier run")

    gateway = start_gateway(tmp_path, workers=2)
    try:
        assert not stale.exists()
        deadline = time.monotonic() + 30  # the first worker up answers /healthz: wait for both
        while gateway.log_text().count("Application startup complete") < 2:
            assert time.monotonic() < deadline, gateway.log_text()
            time.sleep(0.1)
        key = gateway.create_key()
        marker = f"qs-{uuid.uuid4().hex}"
        base = f"{gateway.base_url}/partners/kochava/postback"

        def send(n: int) -> int:
            # 20 new events, 10 retries of them, 10 with a wrong key; the key and a marker
            # travel in the query string, which must never reach the log.
            if n < 20:
                url, txn = f"{base}?api_key={key}&note={marker}", f"w-{n}"
            elif n < 30:
                url, txn = f"{base}?api_key={key}&note={marker}", f"w-{n - 20}"
            else:
                url, txn = f"{base}?api_key=wrong-{marker}&note={marker}", f"w-{n}"
            with httpx.Client(timeout=10) as fresh:  # a new connection: any worker may take it
                return fresh.post(url, content=body(ios(txn))).status_code

        with ThreadPoolExecutor(max_workers=8) as pool:
            first = list(pool.map(send, range(20)))
            rest = list(pool.map(send, range(20, 40)))
        assert Counter(first + rest) == {202: 20, 200: 10, 401: 10}

        expected = {"accepted": 20, "duplicate": 10, "unauthorized": 10}
        deadline = time.monotonic() + 5
        while True:  # each scrape may reach either worker; every one must add up both
            text = httpx.get(f"{gateway.base_url}/metrics", timeout=5).text
            if postbacks_total(text) == expected or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert postbacks_total(text) == expected
        for _ in range(6):
            text = httpx.get(f"{gateway.base_url}/metrics", timeout=5).text
            assert postbacks_total(text) == expected
            assert series(text, "gateway_postback_duration_seconds_count") == {
                labels(partner="kochava"): 40
            }
        # The totals are two workers' own counts added up, not one worker's.
        per_worker = [worker_postbacks(f) for f in sorted(multiproc.glob("counter_*.db"))]
        assert len(per_worker) == 2 and all(per_worker), per_worker
        assert sum(per_worker) == 40
        ready = httpx.get(f"{gateway.base_url}/readyz", timeout=5)
        assert (ready.status_code, ready.json()["status"]) == (200, "ready")
    finally:
        stop_gateway(gateway)

    log = gateway.log_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    postbacks = [line for line in lines if line["msg"] == "postback"]
    assert len(postbacks) == 40
    assert Counter(line["outcome"] for line in postbacks) == expected
    for line in postbacks:
        assert line["partner"] == "kochava"
        assert line["method"] == "POST"
        assert line["status"] in {200, 202, 401}
        assert isinstance(line["duration_ms"], int | float) and line["duration_ms"] >= 0
    assert key not in log
    assert marker not in log  # neither the query string nor the wrong key
    assert "api_key" not in log and "postback?" not in log


def test_log_formatter_redacts_keys_and_query_strings_written_elsewhere() -> None:
    """The safety net under every log line: a library's message or a traceback that carries a
    URL, a key or a bearer token is written without them."""
    secret = uuid.uuid4().hex
    logger = logging.getLogger("tests.redaction")
    try:
        raise ValueError(
            f"bad request to http://gw.example/partners/kochava/postback?api_key={secret}"
        )
    except ValueError:
        record = logger.makeRecord(
            logger.name,
            logging.ERROR,
            __file__,
            1,
            "GET /partners/kochava/postback?api_key=%s&note=x from %s; X-Api-Key: %s; %s",
            (secret, "203.0.113.9", secret, f"Authorization: Bearer {secret}"),
            sys.exc_info(),
        )
    line = json.loads(JsonFormatter().format(record))
    assert secret not in json.dumps(line)
    assert line["msg"] == (
        "GET /partners/kochava/postback?[redacted] from 203.0.113.9; X-Api-Key: [redacted];"
        " Authorization: Bearer [redacted]"
    )
    assert (
        "ValueError: bad request to http://gw.example/partners/kochava/postback?[redacted]"
        in (line["exc"])
    )
    plain = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "postback", (), None)
    assert json.loads(JsonFormatter().format(plain))["msg"] == "postback"
